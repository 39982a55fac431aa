"""Episodes of Gymnasium's own CartPole-v1, as JSON, for tests/cartpole.rs to replay step by step.

Each episode starts from env.reset(seed=s) and follows a fixed policy (a noisy linear controller,
so that some episodes terminate early and some reach the 500-step truncation). Printed: the
gymnasium version and, per episode, the f64 start state and every step's action, f64 state,
f32 observation (each as the bit pattern of the f64 holding it), reward, terminated and truncated.
"""
import json
import struct
import sys

import gymnasium as gym
import numpy as np

def bits(v):
    """The exact f64 bit pattern (JSON readers need not round decimal floats correctly)."""
    return struct.unpack("<Q", struct.pack("<d", float(v)))[0]


episodes = []
for seed in range(12):
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=seed)
    start = [bits(v) for v in env.unwrapped.state]
    rng = np.random.default_rng(1000 + seed)
    noise = [0.0, 0.3, 1.0][seed % 3]
    steps = []
    while True:
        x, x_dot, th, th_dot = env.unwrapped.state
        action = int(th + 0.5 * th_dot + 0.01 * x + 0.1 * x_dot > 0)
        if rng.random() < noise:
            action = int(rng.integers(0, 2))
        obs, reward, terminated, truncated, _ = env.step(action)
        steps.append({
            "action": action,
            "state": [bits(v) for v in env.unwrapped.state],
            "obs": [bits(v) for v in obs],
            "reward": float(reward),
            "terminated": bool(terminated),
            "truncated": bool(truncated),
        })
        if terminated or truncated:
            break
    episodes.append({"seed": seed, "start": start, "steps": steps})
json.dump({"gymnasium": gym.__version__, "episodes": episodes}, sys.stdout)
