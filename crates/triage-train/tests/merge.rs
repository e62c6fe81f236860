//! `triage adapter merge` on the real 0.5B GGUF: the merged model's logits are those of base +
//! adapter (within the rounding of the re-quantized projections), untargeted tensors are
//! copied bit for bit, and an adapter for another shape is refused without leaving a file.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use triage_llm::lora::{Lora, LoraConfig, Target};
use triage_llm::qwen2::{Config, KvCache, LoadOptions, Qwen2};
use triage_llm::GgufFile;
use triage_train::merge::{merge_gguf, MergeOptions};

fn adapter(cfg: &Config, seed: u64) -> Lora {
    let lora = Lora::new(
        cfg,
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            layers: None,
        },
        seed,
        &Device::Cpu,
    )
    .unwrap();
    // A trained adapter has non-zero B (deterministic values, uniform in ±0.03).
    for (i, v) in lora.vars().iter().enumerate() {
        if i % 2 == 1 {
            let mut x = seed * 1000 + i as u64;
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect();
            let b = (Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap() * 0.03).unwrap();
            v.set(&b).unwrap();
        }
    }
    lora
}

fn logits(model: &Qwen2, lora: Option<&Lora>, tokens: &[u32]) -> Tensor {
    model
        .forward_with(tokens, &mut KvCache::default(), tokens.len(), lora)
        .unwrap()
}

/// Mean absolute difference (the max over 1.8M logits is dominated by rounding outliers).
fn mean_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn argmax_rows(t: &Tensor) -> Vec<u32> {
    t.argmax(1).unwrap().to_vec1::<u32>().unwrap()
}

#[test]
fn merged_gguf_gives_base_plus_adapter_logits() {
    let gguf = common::gguf();
    let dev = Device::Cpu;
    let exact = LoadOptions {
        requantize_q5_0: false,
        ..LoadOptions::default()
    };
    let base = Qwen2::load(&gguf, &dev, &exact).unwrap();
    let lora = adapter(base.config(), 11);
    let dir = std::env::temp_dir().join(format!("triage-merge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("merged.gguf");
    let opts = MergeOptions {
        requantize: Some(GgmlDType::Q8_0),
        adapter_name: "test".into(),
    };
    let summary = merge_gguf(gguf.path(), &lora, &out, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(summary.merged, 7 * base.config().num_layers);
    assert!(!dir.join("merged.gguf.tmp").exists());

    let merged_file = GgufFile::open(&out).unwrap();
    let merged = Qwen2::load(&merged_file, &dev, &exact).unwrap();
    let tokens = [5050u32, 21, 3399, 17, 1207, 28, 11, 4216, 9906, 13, 576, 220];
    let with_adapter = logits(&base, Some(&lora), &tokens);
    let plain = logits(&base, None, &tokens);
    let folded = logits(&merged, None, &tokens);
    // The rounding of re-quantizing the projections alone: merge an adapter whose B is zero.
    let zero = Lora::new(base.config(), lora.config.clone(), 11, &dev).unwrap();
    let out0 = dir.join("zero.gguf");
    merge_gguf(gguf.path(), &zero, &out0, &opts, &mut |_, _| {}).unwrap();
    let requantized = Qwen2::load(&GgufFile::open(&out0).unwrap(), &dev, &exact).unwrap();
    let noise = mean_abs(&plain, &logits(&requantized, None, &tokens));

    let effect = mean_abs(&with_adapter, &plain);
    let error = mean_abs(&with_adapter, &folded);
    eprintln!(
        "mean |Δlogit|: adapter effect {effect:.4}; merged vs base + adapter {error:.4}; \
         re-quantization alone {noise:.4}"
    );
    assert!(
        effect > 4.0 * error,
        "the adapter's effect {effect} should dwarf the merge error {error}"
    );
    assert!(
        error < 1.5 * noise + 1e-3,
        "merge error {error} beyond the re-quantization rounding {noise}"
    );
    // The predicted next tokens agree (a near-tie may flip under rounding).
    let same = argmax_rows(&folded)
        .iter()
        .zip(argmax_rows(&with_adapter))
        .filter(|(a, b)| **a == *b)
        .count();
    assert!(
        same >= tokens.len() - 1,
        "only {same} of {} next tokens agree",
        tokens.len()
    );

    // Untargeted tensors are copied unchanged; the adapter is recorded.
    let (src, dst) = (gguf.content(), merged_file.content());
    assert_eq!(src.tensor_infos.len(), dst.tensor_infos.len());
    for name in [
        "token_embd.weight",
        "blk.0.attn_norm.weight",
        "output_norm.weight",
    ] {
        let read = |f: &GgufFile| {
            let mut r = std::io::BufReader::new(std::fs::File::open(f.path()).unwrap());
            f.content()
                .tensor(&mut r, name, &dev)
                .unwrap()
                .data()
                .unwrap()
                .into_owned()
        };
        assert!(read(&gguf) == read(&merged_file), "{name} changed");
    }
    assert!(dst.metadata.contains_key("triage.merged_adapter"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_adapter_of_another_shape_is_refused_and_leaves_no_file() {
    let gguf = common::gguf();
    let lora = adapter(&common::tiny(1000), 3);
    let dir = std::env::temp_dir().join(format!("triage-merge-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("merged.gguf");
    let err = merge_gguf(gguf.path(), &lora, &out, &MergeOptions::default(), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot merge") && err.contains("blk.0."), "{err}");
    assert!(!out.exists() && !dir.join("merged.gguf.tmp").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
