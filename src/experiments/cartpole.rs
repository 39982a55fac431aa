//! CartPole-v1 with Gymnasium's exact dynamics, termination and truncation.
//!
//! The state is `(x, ẋ, θ, θ̇)` in f64, the observation its f32 rounding, as in Gymnasium 1.x.
//! One step applies a force of ±10 N (action 1 pushes right, 0 left) and integrates the
//! Barto–Sutton–Anderson equations with explicit Euler, `τ = 0.02` s:
//!
//! ```text
//! temp = (F + m_p l θ̇² sin θ) / (m_c + m_p)
//! θ̈    = (g sin θ − cos θ · temp) / (l (4/3 − m_p cos² θ / (m_c + m_p)))
//! ẍ    = temp − m_p l θ̈ cos θ / (m_c + m_p)
//! x += τ ẋ;  ẋ += τ ẍ;  θ += τ θ̇;  θ̇ += τ θ̈
//! ```
//!
//! with `g = 9.8`, `m_c = 1`, `m_p = 0.1`, `l = 0.5` (half the pole). The episode terminates
//! when `|x| > 2.4` or `|θ| > 12°` (the step that leaves the box still earns its reward of 1)
//! and is truncated after 500 steps (Gymnasium's `TimeLimit` for `CartPole-v1`). A reset draws
//! each state variable uniformly from `[−0.05, 0.05]`. Every operation is written in the order
//! Gymnasium's code evaluates it, so that the same start state and actions give the same states
//! (`tests/cartpole.rs` checks this step by step against Gymnasium itself).

use crate::error::{Result, TpoError};
use crate::experiments::rng::Rng;

const GRAVITY: f64 = 9.8;
const MASS_CART: f64 = 1.0;
const MASS_POLE: f64 = 0.1;
const HALF_LENGTH: f64 = 0.5;
const FORCE: f64 = 10.0;
const TAU: f64 = 0.02;
const X_THRESHOLD: f64 = 2.4;

/// The pole angle (radians) past which an episode terminates: 12°, computed as Gymnasium does.
pub fn theta_threshold() -> f64 {
    12.0 * 2.0 * std::f64::consts::PI / 360.0
}

/// Steps after which an episode is truncated (`CartPole-v1`'s time limit).
pub const MAX_STEPS: usize = 500;

/// The outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// The new observation (the state rounded to f32).
    pub obs: [f32; 4],
    /// 1 for every step up to and including the one that terminates.
    pub reward: f64,
    /// The pole fell or the cart left the track.
    pub terminated: bool,
    /// The time limit was reached without termination.
    pub truncated: bool,
}

/// One CartPole-v1 episode.
#[derive(Debug, Clone)]
pub struct CartPole {
    state: [f64; 4],
    steps: usize,
    done: bool,
}

impl CartPole {
    /// A new episode from a uniform draw in `[−0.05, 0.05]^4`.
    pub fn reset(rng: &mut Rng) -> Self {
        let mut state = [0.0; 4];
        for s in &mut state {
            *s = -0.05 + 0.1 * rng.uniform();
        }
        Self::from_state(state)
    }

    /// A new episode from a given state (for replaying another implementation's episode).
    pub fn from_state(state: [f64; 4]) -> Self {
        Self { state, steps: 0, done: false }
    }

    /// The exact state `(x, ẋ, θ, θ̇)`.
    pub fn state(&self) -> [f64; 4] {
        self.state
    }

    /// The observation: the state rounded to f32.
    pub fn obs(&self) -> [f32; 4] {
        self.state.map(|v| v as f32)
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Whether the episode has ended (terminated or truncated).
    pub fn done(&self) -> bool {
        self.done
    }

    /// Applies `action` (0: push left, 1: push right). Stepping an ended episode or an action
    /// other than 0 or 1 is an error.
    pub fn step(&mut self, action: usize) -> Result<Transition> {
        if action > 1 {
            return Err(TpoError::BadConfig {
                name: "CartPole action",
                requirement: "0 or 1",
                got: action as f64,
            });
        }
        if self.done {
            return Err(TpoError::BadConfig {
                name: "CartPole step after the episode ended (steps taken)",
                requirement: "reset first",
                got: self.steps as f64,
            });
        }
        let [x, x_dot, theta, theta_dot] = self.state;
        let total_mass = MASS_POLE + MASS_CART;
        let polemass_length = MASS_POLE * HALF_LENGTH;
        let force = if action == 1 { FORCE } else { -FORCE };
        let (costheta, sintheta) = (theta.cos(), theta.sin());
        let temp = (force + polemass_length * (theta_dot * theta_dot) * sintheta) / total_mass;
        let thetaacc = (GRAVITY * sintheta - costheta * temp)
            / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * (costheta * costheta) / total_mass));
        let xacc = temp - polemass_length * thetaacc * costheta / total_mass;
        let state =
            [x + TAU * x_dot, x_dot + TAU * xacc, theta + TAU * theta_dot, theta_dot + TAU * thetaacc];
        self.state = state;
        self.steps += 1;
        let th = theta_threshold();
        let terminated = state[0] < -X_THRESHOLD || state[0] > X_THRESHOLD || state[2] < -th || state[2] > th;
        let truncated = !terminated && self.steps >= MAX_STEPS;
        self.done = terminated || truncated;
        Ok(Transition { obs: self.obs(), reward: 1.0, terminated, truncated })
    }
}
