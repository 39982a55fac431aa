"""What the CPU and CUDA sides of the ops share."""


def path_opts(temperature, entropy, seq_reduce, eta, zero_std_threshold, anchored, kl, reduction,
              global_num_groups, grad_scale) -> dict:  # fmt: skip
    """The options of a token-path call as the native module reads them (``PathOpts``)."""
    return {
        "temperature": temperature,
        "entropy": entropy,
        "seq_reduce": seq_reduce,
        "eta": eta,
        "zero_std_threshold": zero_std_threshold,
        "anchored": anchored,
        "kl": kl,
        "reduction": reduction,
        "global_num_groups": global_num_groups,
        "grad_scale": grad_scale,
    }
