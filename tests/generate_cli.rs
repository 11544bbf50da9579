//! `diffusiond generate` as a user runs it: the real binary, the tiny reference model.
#![allow(clippy::unwrap_used)]

mod common;
mod server_support;

use std::process::Command;

use diffusiond::pipeline::{denoise, GenerateSpec, Guidance};

/// Run `diffusiond generate` with the test catalog (the shipped one, sizes scaled for the tiny
/// model) and `args`.
fn generate(args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let catalog = server_support::write_test_catalog(dir.path());
    Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .arg("generate")
        .arg("--catalog")
        .arg(&catalog)
        .args(["--device", "cpu"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn writes_the_library_images_for_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let weights = format!("z-image-turbo={}", common::tiny_dir().display());
    let o = generate(&[
        "--prompt",
        "a red fox sitting in the snow",
        "--width",
        "96",
        "--height",
        "64",
        "--num-images",
        "2",
        "--seed",
        "7",
        "--weights",
        &weights,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let model = common::load(common::tiny_dir());
    let want = denoise::generate(
        &model,
        &GenerateSpec {
            prompt: "a red fox sitting in the snow".into(),
            negative_prompt: String::new(),
            width: 96,
            height: 64,
            seeds: vec![7, 8],
            steps: 8,
            guidance: Guidance::none(),
        },
        |_, _| {},
    )
    .unwrap();
    for (i, w) in want.iter().enumerate() {
        let img = image::open(dir.path().join(format!("fox_{i}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!((img.width(), img.height()), (96, 64));
        assert_eq!(
            img.as_raw(),
            &w.data,
            "image {i} differs from the library's"
        );
    }

    // Other formats by extension.
    for ext in ["jpg", "webp"] {
        let out = dir.path().join(format!("one.{ext}"));
        let o = generate(&[
            "--prompt",
            "tea",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--weights",
            &weights,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let img = image::open(&out).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }
}

#[test]
fn bad_arguments_get_one_line_and_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let out = out.to_str().unwrap();
    let weights = format!("z-image-turbo={}", common::tiny_dir().display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--prompt",
                "x",
                "--width",
                "100",
                "--height",
                "64",
                "--weights",
                &weights,
                "--out",
                out,
            ],
            "multiple of 16",
        ),
        (
            vec!["--model", "nope", "--prompt", "x", "--out", out],
            "unknown model 'nope'",
        ),
        (
            vec![
                "--prompt",
                "x",
                "--width",
                "64",
                "--height",
                "64",
                "--weights",
                "z-image-turbo=/no/such/dir",
                "--out",
                out,
            ],
            "/no/such/dir",
        ),
        (
            vec![
                "--prompt",
                "x",
                "--width",
                "64",
                "--height",
                "64",
                "--weights",
                &weights,
                "--out",
                "x.gif",
            ],
            "image format",
        ),
    ];
    for (args, needle) in cases {
        let o = generate(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].contains(needle), "{args:?}: {err}");
    }
    assert!(!dir.path().join("x.png").exists());
}
