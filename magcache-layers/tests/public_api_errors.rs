//! The public helpers a new model crate calls return errors, not panics, on values the caller got
//! wrong: a flow schedule without its final sigma, zero heads, too few modulation chunks, a crop
//! outside the picture, pixels that do not hold the picture's size.

use candle_core::{DType, Device, Tensor};
use magcache_layers::mmdit::chunks;
use magcache_layers::nn::{split_heads, Linear};
use magcache_layers::picture::{resize, Filter, Rgb8};
use magcache_layers::scheduler::{FlowSchedule, FlowStepper};

#[test]
fn a_flow_schedule_without_its_final_sigma_is_an_error() {
    let s = FlowSchedule {
        timesteps: vec![1000.0, 500.0],
        sigmas: vec![1.0, 0.5],
    };
    let e = s.check_lengths().unwrap_err().to_string();
    assert!(e.contains("2 timesteps need 3 sigmas"), "{e}");
    assert_eq!(s.dt(1), 0.0);
    let lat = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
    let mut st = FlowStepper::Euler(s);
    // Step 0 had its sigmas; the schedule is refused whole all the same.
    assert!(st.step(0, &lat, &lat).is_err());
    assert!(st.step(1, &lat, &lat).is_err());
    let ok = FlowSchedule {
        timesteps: vec![1000.0, 500.0],
        sigmas: vec![1.0, 0.5, 0.0],
    };
    ok.check_lengths().unwrap();
    assert_eq!(ok.dt(1), -0.5);
}

#[test]
fn heads_that_do_not_split_the_width_are_an_error() {
    let x = Tensor::zeros((1, 3, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(split_heads(&x, 0)
        .unwrap_err()
        .to_string()
        .contains("0 heads"));
    assert!(split_heads(&x, 3).is_err());
    assert_eq!(split_heads(&x, 2).unwrap().dims(), &[1, 2, 3, 4]);
}

#[test]
fn modulation_chunks_that_do_not_divide_are_an_error() {
    let w = Tensor::zeros((6, 4), DType::F32, &Device::Cpu).unwrap();
    let lin = Linear::new(w, None).unwrap();
    let temb = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(chunks(&lin, &temb, 0).is_err());
    assert!(chunks(&lin, &temb, 4).is_err());
    assert_eq!(chunks(&lin, &temb, 3).unwrap().len(), 3);
}

#[test]
fn pictures_refuse_windows_and_sizes_they_do_not_hold() {
    let img = Rgb8 {
        width: 4,
        height: 3,
        data: vec![7; 36],
    };
    assert_eq!(img.crop(1, 1, 3, 2).unwrap().data.len(), 18);
    let e = img.crop(2, 0, 3, 3).unwrap_err().to_string();
    assert!(e.contains("outside the 4x3 picture"), "{e}");
    assert!(img.crop(usize::MAX, 0, 2, 1).is_err());
    assert!(resize(&img, 0, 2, Filter::Lanczos).is_err());
    let short = Rgb8 {
        data: vec![7; 35],
        ..img.clone()
    };
    assert!(short.to_vae_tensor(&Device::Cpu).is_err());
    assert!(resize(&short, 2, 2, Filter::Lanczos).is_err());
    assert!(short.crop(0, 0, 1, 1).is_err());
}
