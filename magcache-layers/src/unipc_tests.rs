//! Unit tests of [`super`] (`unipc.rs`).
use super::*;
use candle_core::Device;

const WAN: &str = r#"{"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
    "use_flow_sigmas": true, "flow_shift": 3.0, "solver_order": 2, "solver_type": "bh2",
    "predict_x0": true, "lower_order_final": true, "disable_corrector": [], "final_sigmas_type": "zero",
    "timestep_spacing": "linspace", "num_train_timesteps": 1000, "thresholding": false,
    "beta_schedule": "linear", "some_future_key": 7}"#;

#[test]
fn reads_the_wan_config() {
    let c = UniPcConfig::from_json_str(WAN, "s.json").unwrap();
    assert_eq!(c, UniPcConfig::wan(3.0));
}

#[test]
fn unsupported_settings_name_file_and_key() {
    for (from, to, key) in [
        (
            r#""solver_type": "bh2""#,
            r#""solver_type": "dpm""#,
            "solver_type",
        ),
        (
            r#""predict_x0": true"#,
            r#""predict_x0": false"#,
            "predict_x0",
        ),
        (
            r#""prediction_type": "flow_prediction""#,
            r#""prediction_type": "epsilon""#,
            "prediction_type",
        ),
        (
            r#""thresholding": false"#,
            r#""thresholding": true"#,
            "thresholding",
        ),
        (r#""flow_shift": 3.0"#, r#""flow_shift": "x""#, "flow_shift"),
        (r#""flow_shift": 3.0"#, r#""flow_shift": -1"#, "flow_shift"),
        (
            r#""final_sigmas_type": "zero""#,
            r#""final_sigmas_type": "other""#,
            "final_sigmas_type",
        ),
        (
            r#""lower_order_final": true"#,
            r#""lower_order_final": false"#,
            "lower_order_final",
        ),
    ] {
        let text = WAN.replace(from, to);
        assert_ne!(text, WAN);
        let err = UniPcConfig::from_json_str(&text, "s.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("s.json") && err.contains(key), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
    let err = UniPcConfig::from_json_str(r#"{"prediction_type": "flow_prediction"}"#, "s.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("use_flow_sigmas"), "{err}");
    let err = UniPcConfig::from_json_str(
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler"}"#,
        "s.json",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("_class_name"), "{err}");
}

#[test]
fn schedule_ends() {
    let s = UniPcConfig::wan(5.0).schedule(12).unwrap();
    assert_eq!(s.timesteps[0], 999);
    assert_eq!(s.sigmas[0], 0.999999f32);
    assert_eq!(s.sigmas.len(), 13);
    assert_eq!(s.sigmas[12], 0.0);
    let mut c = UniPcConfig::wan(5.0);
    c.final_sigmas_type = FinalSigmas::SigmaMin;
    let s = c.schedule(12).unwrap();
    assert_eq!(s.sigmas[12], s.sigmas[11]);
    assert!(UniPcConfig::wan(5.0).schedule(0).is_err());
}

#[test]
fn last_step_lands_on_the_data_prediction_and_extra_steps_fail() {
    let dev = Device::Cpu;
    let mut u = UniPc::new(&UniPcConfig::wan(3.0), 3).unwrap();
    let mut x = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
    let v = Tensor::new(&[0.1f32, 0.2, -0.3], &dev).unwrap();
    for _ in 0..2 {
        x = u.step(&v, &x).unwrap();
    }
    let sigma = u.schedule().sigmas[2];
    let m = (&x - (&v * sigma as f64).unwrap()).unwrap();
    let out = u.step(&v, &x).unwrap();
    let d = (out - m)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    assert!(u.step(&v, &x).is_err());
}

#[test]
fn solve_small_systems() {
    let x = solve(vec![vec![1.0, 1.0], vec![-2.0, 1.0]], vec![3.0, 0.0]).unwrap();
    assert!(
        (x[0] - 1.0).abs() < 1e-6 && (x[1] - 2.0).abs() < 1e-6,
        "{x:?}"
    );
    assert!(solve(vec![vec![1.0, 1.0], vec![1.0, 1.0]], vec![1.0, 2.0]).is_err());
}
