//! The reversal transformer's fused CPU ops (`tpo::experiments::fused`) against the composite
//! candle forms they replace: values and the gradients of `sum(w * op(..))` with respect to every
//! input, on random shapes and values (extreme magnitudes included), in `f64` (against the
//! composite in `f64`) and in `f32` (against the composite in `f64` on the same, f32-rounded,
//! inputs); the key/value-cache case of the attention; shape errors; run-to-run bits.

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use tpo::experiments::fused;
use tpo::experiments::rng::Rng;

type R<T> = candle_core::Result<T>;
type Op = dyn Fn(&[Tensor]) -> R<Tensor>;

/// Value and gradients (w.r.t. every input) of `sum(w * op(inputs))`, all as f64.
fn eval(op: &Op, inputs: &[(Vec<f64>, Vec<usize>)], w: &[f64], dtype: DType) -> R<(Vec<f64>, Vec<Vec<f64>>)> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(v, s)| {
            Var::from_tensor(&Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu)?.to_dtype(dtype)?)
        })
        .collect::<R<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&ts)?;
    let wt = Tensor::from_vec(w.to_vec(), out.shape(), &Device::Cpu)?.to_dtype(dtype)?;
    let grads = (out.clone() * wt)?.sum_all()?.backward()?;
    let f64s = |t: &Tensor| -> R<Vec<f64>> { t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>() };
    let gs =
        ts.iter().map(|t| f64s(grads.get(t).expect("every input has a gradient"))).collect::<R<Vec<_>>>()?;
    Ok((f64s(&out)?, gs))
}

/// `max |got - want| <= rtol max(max |want|, floor)` (normwise), with a message naming what differs.
/// `floor` is the quantity's natural size, for quantities that cancel to (nearly) zero.
fn close(what: &str, got: &[f64], want: &[f64], rtol: f64, floor: f64) -> std::result::Result<(), String> {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(floor).max(1e-300);
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0.0f64), |(bi, be), (i, e)| if e > be || e.is_nan() { (i, e) } else { (bi, be) });
    if err.is_nan() || err > rtol * scale {
        return Err(format!(
            "{what}: entry {i}: fused {} vs composite {} (max error {err:e}, scale {scale:e})",
            got[i], want[i]
        ));
    }
    Ok(())
}

/// The fused op in `f64` and `f32` against the composite in `f64`, values and gradients.
/// `floors`: the natural sizes of the value and of each gradient (see [`close`]).
fn compare(
    name: &str,
    fusedop: &Op,
    composite: &Op,
    inputs: Vec<(Vec<f64>, Vec<usize>)>,
    w: Vec<f64>,
    floors: &[f64],
) -> Result<(), String> {
    let e = |e: candle_core::Error| format!("{name}: {e}");
    // f32-representable inputs and weights, so that the f32 run and the f64 reference see the same.
    let inputs: Vec<_> =
        inputs.into_iter().map(|(v, s)| (v.iter().map(|&x| x as f32 as f64).collect(), s)).collect();
    let w: Vec<f64> = w.iter().map(|&x| x as f32 as f64).collect();
    let (v_ref, g_ref) = eval(composite, &inputs, &w, DType::F64).map_err(e)?;
    for (dtype, rtol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
        let (v, g) = eval(fusedop, &inputs, &w, dtype).map_err(e)?;
        close(&format!("{name} {dtype:?} value"), &v, &v_ref, rtol, floors[0])?;
        for (k, (a, b)) in g.iter().zip(&g_ref).enumerate() {
            close(&format!("{name} {dtype:?} gradient of input {k}"), a, b, rtol, floors[k + 1])?;
        }
    }
    Ok(())
}

fn normals(r: &mut Rng, n: usize, s: f64) -> Vec<f64> {
    (0..n).map(|_| s * r.normal()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn layer_norm_matches_the_composite(
        rows in 1usize..20, d in 1usize..40, seed in any::<u64>(),
        mag in prop::sample::select(vec![1e-3, 1.0, 1e3]), shift in prop::sample::select(vec![0.0, 3.0]),
        eps in prop::sample::select(vec![1e-6, 1e-3]),
    ) {
        // d = 1 makes every centred value 0: the output is beta, the gradient of x 0.
        let mut r = Rng::new(seed);
        let x: Vec<f64> = normals(&mut r, rows * d, mag).into_iter().map(|v| v + shift * mag).collect();
        let g = normals(&mut r, d, 1.0);
        let b = normals(&mut r, d, 1.0);
        let w = normals(&mut r, rows * d, 1.0);
        let f: &Op = &move |t: &[Tensor]| fused::layer_norm(&t[0], &t[1], &t[2], eps);
        let c: &Op = &move |t: &[Tensor]| fused::layer_norm_composite(&t[0], &t[1], &t[2], eps);
        // dx is of size |w| |gamma| / std(x) (and cancels to ~0 when d <= 2).
        let floors = [0.0, 1.0 / mag, 0.0, 0.0];
        let res = compare("layer_norm", f, c, vec![(x, vec![rows, d]), (g, vec![d]), (b, vec![d])], w, &floors);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }

    #[test]
    fn causal_attention_matches_the_composite(
        n in 1usize..4, l in 1usize..7, cached in 0usize..5, h in 1usize..4, dh in 1usize..9,
        seed in any::<u64>(), mag in prop::sample::select(vec![0.1, 1.0, 4.0]),
    ) {
        // cached > 0: the first keys and values come from a cache (the rollout's path).
        let lk = l + cached;
        let mut r = Rng::new(seed);
        let q = normals(&mut r, n * l * h * dh, mag);
        let k = normals(&mut r, n * lk * h * dh, mag);
        let v = normals(&mut r, n * lk * h * dh, 1.0);
        let w = normals(&mut r, n * l * h * dh, 1.0);
        let scale = 1.0 / (dh as f64).sqrt();
        let f: &Op = &move |t: &[Tensor]| fused::causal_attention(&t[0], &t[1], &t[2], scale);
        let c: &Op = &move |t: &[Tensor]| fused::causal_attention_composite(&t[0], &t[1], &t[2], scale);
        let res = compare(
            "causal_attention", f, c,
            vec![(q, vec![n, l, h, dh]), (k, vec![n, lk, h, dh]), (v, vec![n, lk, h, dh])], w,
            // dq, dk ~ scale p (1 - p) |k| |v . w|: they cancel to ~0 where the softmax saturates.
            &[0.0, mag, mag, 0.0],
        );
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }

    #[test]
    fn log_softmax_matches_the_composite(
        rows in 1usize..30, d in 1usize..20, seed in any::<u64>(),
        mag in prop::sample::select(vec![1e-3, 1.0, 30.0]),
    ) {
        let mut r = Rng::new(seed);
        let x = normals(&mut r, rows * d, mag);
        let w = normals(&mut r, rows * d, 1.0);
        let f: &Op = &|t: &[Tensor]| fused::log_softmax(&t[0]);
        let c: &Op = &|t: &[Tensor]| fused::log_softmax_composite(&t[0]);
        let res = compare("log_softmax", f, c, vec![(x, vec![rows, d])], w, &[0.0; 2]);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }

    #[test]
    fn gelu_matches_the_composite(n in 1usize..200, seed in any::<u64>(), mag in prop::sample::select(vec![0.01, 1.0, 10.0])) {
        let mut r = Rng::new(seed);
        let x = normals(&mut r, n, mag);
        let w = normals(&mut r, n, 1.0);
        // In the far negative tail the composite's 1 + tanh(u) cancels (to ~1e-16 |x|): the
        // value is compared at the size of x, the gradient at the size of 1.
        let f: &Op = &|t: &[Tensor]| fused::gelu(&t[0]);
        let c: &Op = &|t: &[Tensor]| fused::gelu_composite(&t[0]);
        let res = compare("gelu", f, c, vec![(x, vec![n])], w, &[mag, 1.0]);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn add_bias_matches_the_composite(
        lead in prop::collection::vec(1usize..6, 0..3), trail in prop::collection::vec(1usize..7, 1..3),
        seed in any::<u64>(),
    ) {
        // b [trail..] broadcast over x [lead.., trail..] (lead empty: x and b of one shape).
        let mut r = Rng::new(seed);
        let xs: Vec<usize> = lead.iter().chain(&trail).copied().collect();
        let n: usize = xs.iter().product();
        let m: usize = trail.iter().product();
        let x = normals(&mut r, n, 1.0);
        let b = normals(&mut r, m, 1.0);
        let w = normals(&mut r, n, 1.0);
        let f: &Op = &|t: &[Tensor]| fused::add_bias(&t[0], &t[1]);
        let c: &Op = &|t: &[Tensor]| fused::add_bias_composite(&t[0], &t[1]);
        let res = compare("add_bias", f, c, vec![(x, xs), (b, trail)], w, &[0.0; 3]);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }

    #[test]
    fn bias_gelu_matches_the_composite(
        rows in 1usize..12, d in 1usize..30, seed in any::<u64>(),
        mag in prop::sample::select(vec![1e-4, 0.01, 1.0, 10.0]),
    ) {
        let mut r = Rng::new(seed);
        let x = normals(&mut r, rows * d, mag);
        let b = normals(&mut r, d, mag);
        let w = normals(&mut r, rows * d, 1.0);
        let f: &Op = &|t: &[Tensor]| fused::bias_gelu(&t[0], &t[1]);
        let c: &Op = &|t: &[Tensor]| fused::bias_gelu_composite(&t[0], &t[1]);
        let res = compare("bias_gelu", f, c, vec![(x, vec![rows, d]), (b, vec![d])], w, &[mag, 1.0, 1.0]);
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }
}

#[test]
fn attention_with_a_cache_equals_the_rows_of_the_full_attention() -> R<()> {
    // The last 2 queries against all 5 keys give the last 2 rows of the full causal attention.
    let mut r = Rng::new(3);
    let (n, l, h, dh) = (2, 5, 2, 3);
    let mk = |r: &mut Rng, len: usize| {
        Tensor::from_vec(normals(r, n * len * h * dh, 1.0), (n, len, h, dh), &Device::Cpu)
    };
    let (q, k, v) = (mk(&mut r, l)?, mk(&mut r, l)?, mk(&mut r, l)?);
    let full = fused::causal_attention(&q, &k, &v, 0.5)?.narrow(1, 3, 2)?;
    let part = fused::causal_attention(&q.narrow(1, 3, 2)?, &k, &v, 0.5)?;
    let d = (full - part)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert_eq!(d, 0.0);
    Ok(())
}

#[test]
fn log_softmax_takes_minus_infinity_and_huge_logits() -> R<()> {
    // A -inf logit has probability 0 (log-prob -inf, gradient the upstream one); logits of +-1e30
    // neither overflow nor absorb the log-sum (-1e30 against 1e30 has log-prob -2e30).
    let x =
        Var::from_tensor(&Tensor::new(&[[f64::NEG_INFINITY, 0.0, 1.0], [1e30, -1e30, 1e30]], &Device::Cpu)?)?;
    let y = fused::log_softmax(x.as_tensor())?;
    let v = y.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(v[0], f64::NEG_INFINITY);
    let want1 = -(1.0 + 1f64.exp()).ln();
    assert!((v[1] - want1).abs() < 1e-15 && (v[2] - (1.0 + want1)).abs() < 1e-15, "{v:?}");
    assert_eq!(&v[3..], &[-(2f64.ln()), -2e30, -(2f64.ln())]);
    let w = Tensor::new(&[[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], &Device::Cpu)?;
    let g =
        (y * w)?.sum_all()?.backward()?.get(x.as_tensor()).expect("grad").flatten_all()?.to_vec1::<f64>()?;
    assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
    assert_eq!(g[0], 1.0);
    assert!((g[1] + g[2] - (2.0 + 3.0 - 6.0)).abs() < 1e-12, "{g:?}");
    Ok(())
}

/// The message is one line (candle appends a backtrace to it when `RUST_BACKTRACE` is set).
fn one_line(e: &str) -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some() || !e.contains('\n')
}

#[test]
fn bad_shapes_are_one_line_errors() -> R<()> {
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu);
    let e = fused::layer_norm(&z(&[3, 4])?, &z(&[3])?, &z(&[4])?, 1e-6).unwrap_err().to_string();
    assert!(e.contains("must be [4]") && one_line(&e), "{e}");
    let e = fused::layer_norm(&z(&[3, 4])?, &z(&[4])?, &z(&[4])?, f64::NAN).unwrap_err().to_string();
    assert!(e.contains("eps") && one_line(&e), "{e}");
    let e = fused::causal_attention(&z(&[1, 3, 2, 4])?, &z(&[1, 2, 2, 4])?, &z(&[1, 2, 2, 4])?, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not fit") && one_line(&e), "{e}");
    let e = fused::causal_attention(&z(&[1, 3, 2, 4])?, &z(&[1, 3, 2, 4])?, &z(&[1, 3, 1, 4])?, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not fit") && one_line(&e), "{e}");
    let e = fused::add_bias(&z(&[3, 4])?, &z(&[3])?).unwrap_err().to_string();
    assert!(e.contains("trailing dimensions") && one_line(&e), "{e}");
    let e = fused::bias_gelu(&z(&[3, 4])?, &z(&[3])?).unwrap_err().to_string();
    assert!(e.contains("must be [4]") && one_line(&e), "{e}");
    let i = Tensor::zeros((2, 3), DType::U32, &Device::Cpu)?;
    let e = fused::log_softmax(&i).unwrap_err().to_string();
    assert!(e.contains("f32 or f64") && one_line(&e), "{e}");
    Ok(())
}

#[test]
fn fused_ops_give_the_same_bits_run_to_run() -> R<()> {
    let mut r = Rng::new(11);
    let x = Var::from_tensor(
        &Tensor::from_vec(normals(&mut r, 4 * 6 * 2 * 8, 1.0), (4, 6, 2, 8), &Device::Cpu)?
            .to_dtype(DType::F32)?,
    )?;
    let once = || -> R<Vec<u32>> {
        let t = x.as_tensor();
        let o = fused::causal_attention(t, t, t, 0.3)?.reshape((24, 16))?;
        let g = Tensor::ones(16, DType::F32, &Device::Cpu)?;
        let y = fused::log_softmax(&fused::gelu(&fused::layer_norm(&o, &g, &g, 1e-6)?)?)?;
        let grads = y.sum_all()?.backward()?;
        let mut bits: Vec<u32> = y.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect();
        bits.extend(grads.get(t).expect("grad").flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()));
        Ok(bits)
    };
    assert_eq!(once()?, once()?);
    Ok(())
}

#[test]
fn untracked_inputs_give_the_same_values_as_tracked_ones() -> R<()> {
    // Without a tracked input the ops keep nothing for a backward (the rollouts' path).
    let mut r = Rng::new(5);
    let mk = |r: &mut Rng, s: &[usize]| -> R<Tensor> {
        Tensor::from_vec(normals(r, s.iter().product(), 1.0), s, &Device::Cpu)?.to_dtype(DType::F32)
    };
    let (x, g, b) = (mk(&mut r, &[6, 8])?, mk(&mut r, &[8])?, mk(&mut r, &[8])?);
    let (q, k, v) = (mk(&mut r, &[2, 3, 2, 4])?, mk(&mut r, &[2, 5, 2, 4])?, mk(&mut r, &[2, 5, 2, 4])?);
    let var = |t: &Tensor| -> R<Tensor> { Ok(Var::from_tensor(t)?.as_tensor().clone()) };
    let bits = |t: Tensor| -> R<Vec<u32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    };
    assert!(!x.track_op() && var(&x)?.track_op());
    assert_eq!(
        bits(fused::layer_norm(&x, &g, &b, 1e-6)?)?,
        bits(fused::layer_norm(&var(&x)?, &g, &b, 1e-6)?)?
    );
    assert_eq!(
        bits(fused::causal_attention(&q, &k, &v, 0.5)?)?,
        bits(fused::causal_attention(&q, &var(&k)?, &v, 0.5)?)?
    );
    assert_eq!(bits(fused::bias_gelu(&x, &b)?)?, bits(fused::bias_gelu(&x, &var(&b)?)?)?);
    Ok(())
}

#[test]
fn results_do_not_depend_on_the_thread_count() -> R<()> {
    // Rows and sequences are split over rayon's threads in fixed blocks: the same bits with 1 and
    // with 3 threads, values and gradients, in f64 (f32 rounding would hide a changed order of
    // summation), on 140 rows (three blocks).
    let mut r = Rng::new(21);
    let (n, l, h, dh) = (20, 7, 2, 8);
    let d = h * dh;
    let x = Var::from_tensor(&Tensor::from_vec(normals(&mut r, n * l * d, 1.0), (n * l, d), &Device::Cpu)?)?;
    let b = Var::from_tensor(&Tensor::from_vec(normals(&mut r, d, 1.0), d, &Device::Cpu)?)?;
    let run = || -> R<Vec<u64>> {
        let t = x.as_tensor();
        let y = fused::layer_norm(t, b.as_tensor(), b.as_tensor(), 1e-6)?.reshape((n, l, h, dh))?;
        let o = fused::causal_attention(&y, &y, &y, 0.4)?.reshape((n * l, d))?;
        let z = fused::add_bias(&fused::bias_gelu(&o, b.as_tensor())?, b.as_tensor())?;
        let w = Tensor::from_vec(
            (0..n * l * d).map(|i| (i % 7) as f64 - 3.0).collect::<Vec<_>>(),
            (n * l, d),
            &Device::Cpu,
        )?;
        let grads = (z.clone() * w)?.sum_all()?.backward()?;
        let mut bits: Vec<u64> = z.flatten_all()?.to_vec1::<f64>()?.iter().map(|v| v.to_bits()).collect();
        for v in [t, b.as_tensor()] {
            bits.extend(
                grads.get(v).expect("grad").flatten_all()?.to_vec1::<f64>()?.iter().map(|v| v.to_bits()),
            );
        }
        Ok(bits)
    };
    let pool = |k: usize| rayon::ThreadPoolBuilder::new().num_threads(k).build().expect("a thread pool");
    let one = pool(1).install(run)?;
    let three = pool(3).install(run)?;
    assert_eq!(one.len(), three.len());
    if let Some(i) = one.iter().zip(&three).position(|(a, b)| a != b) {
        let (a, b) = (f64::from_bits(one[i]), f64::from_bits(three[i]));
        panic!("entry {i} of {}: {a:e} with 1 thread, {b:e} with 3", one.len());
    }
    Ok(())
}
