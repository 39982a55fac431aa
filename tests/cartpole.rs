//! Our CartPole-v1 against Gymnasium's own, step by step.
//!
//! `scripts/cartpole_trace.py` runs Gymnasium's CartPole-v1 (12 episodes from `reset(seed)`,
//! a noisy linear controller: some end by termination, some by the 500-step truncation) and
//! prints every step. This test replays the same start states and actions and requires the
//! same f64 states bit for bit, the same f32 observations, rewards, termination and truncation.
//! It needs Python with `gymnasium` (pinned in `scripts/test.sh`, which installs it); without
//! it the test fails and says so.
use serde_json::Value;
use tpo::experiments::cartpole::{CartPole, MAX_STEPS};

fn gymnasium_trace() -> Value {
    let python = std::env::var("TPO_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cartpole_trace.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; this test needs Python with gymnasium"));
    assert!(
        out.status.success(),
        "Gymnasium's CartPole could not be run (is gymnasium installed? `bash scripts/test.sh` installs \
         it): {}",
        String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
    );
    serde_json::from_slice(&out.stdout).expect("the trace script prints JSON")
}

/// Floats travel as the bit patterns of f64s (exact, whatever the JSON reader's float parsing).
fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| f64::from_bits(x.as_u64().unwrap())).collect()
}

#[test]
fn cartpole_matches_gymnasium_step_by_step() {
    let trace = gymnasium_trace();
    let episodes = trace["episodes"].as_array().unwrap();
    let (mut terminated, mut truncated, mut steps) = (0, 0, 0);
    for ep in episodes {
        let start: [f64; 4] = f64s(&ep["start"]).try_into().unwrap();
        let mut env = CartPole::from_state(start);
        for (i, st) in ep["steps"].as_array().unwrap().iter().enumerate() {
            let action = st["action"].as_u64().unwrap() as usize;
            let t = env.step(action).unwrap();
            let want = f64s(&st["state"]);
            let at = format!("episode seed {} step {}", ep["seed"], i + 1);
            for (k, (g, w)) in env.state().iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{at}: state[{k}] {g:e} vs Gymnasium {w:e}");
            }
            let obs: Vec<f64> = t.obs.iter().map(|&x| f64::from(x)).collect();
            assert_eq!(obs, f64s(&st["obs"]), "{at}: observation");
            assert_eq!(t.reward, st["reward"].as_f64().unwrap(), "{at}: reward");
            assert_eq!(t.terminated, st["terminated"].as_bool().unwrap(), "{at}: terminated");
            assert_eq!(t.truncated, st["truncated"].as_bool().unwrap(), "{at}: truncated");
            steps += 1;
        }
        assert!(env.done(), "episode seed {}: Gymnasium ended it, ours did not", ep["seed"]);
        assert!(env.step(0).is_err(), "stepping an ended episode must be refused");
        terminated += usize::from(env.steps() < MAX_STEPS);
        truncated += usize::from(env.steps() == MAX_STEPS);
    }
    // The trace exercises both endings.
    assert!(terminated >= 3 && truncated >= 3, "{terminated} terminated, {truncated} truncated");
    assert!(steps > 2000);
}

#[test]
fn cartpole_refuses_bad_actions() {
    let mut env = CartPole::from_state([0.0; 4]);
    assert!(env.step(2).is_err());
    assert!(env.step(0).is_ok());
}
