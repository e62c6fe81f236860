//! The training forward on a tiny random Qwen2: gradients reach every LoRA matrix of every
//! layer and agree with finite differences, and the inference path with the adapter gives the
//! same logits as the training path.

use candle_core::{DType, Device, Tensor, Var};
use triage_llm::lora::{Lora, LoraConfig, Target};
use triage_llm::qwen2::{Config, KvCache, Qwen2};

fn tiny() -> Config {
    Config {
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        rms_eps: 1e-6,
        max_position: 4096,
    }
}

fn adapter(cfg: &Config, device: &Device) -> Lora {
    let lora = Lora::new(
        cfg,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
        },
        3,
        device,
    )
    .unwrap();
    // Non-zero B, so that A receives a gradient too.
    for (i, v) in lora.vars().iter().enumerate() {
        if i % 2 == 1 {
            let r = Tensor::randn(0f32, 0.2, v.shape(), device).unwrap();
            v.set(&r).unwrap();
        }
    }
    lora
}

fn loss(model: &Qwen2, lora: &Lora, tokens: &Tensor, prefix: &KvCache, probe: &Tensor) -> Tensor {
    let logits = model
        .forward_train(tokens, Some(prefix), Some(lora), 1, None)
        .unwrap();
    (logits * probe).unwrap().sum_all().unwrap()
}

#[test]
fn gradients_reach_every_adapter_matrix_and_match_finite_differences() {
    let device = Device::Cpu;
    let cfg = tiny();
    let model = Qwen2::random(&cfg, 1, &device).unwrap();
    let lora = adapter(&cfg, &device);
    let mut prefix = KvCache::default();
    model.forward(&[5, 9, 17, 33], &mut prefix, 1).unwrap();
    let tokens = Tensor::new(&[[3u32, 7, 11, 2, 40, 41]], &device).unwrap();
    let probe = Tensor::randn(0f32, 1.0, (1, 5, cfg.vocab_size), &device).unwrap();
    let l = loss(&model, &lora, &tokens, &prefix, &probe);
    let grads = l.backward().unwrap();

    // Every matrix of every layer and target gets a non-zero gradient: a fused kernel without
    // backward anywhere in the graph would zero the gradient of every layer before it.
    for (li, m) in lora.layers.iter().enumerate() {
        for (t, p) in m {
            for (name, v) in [("A", &p.a), ("B", &p.b)] {
                let g = grads
                    .get(v)
                    .unwrap_or_else(|| panic!("layer {li} {t:?} {name}: no gradient"));
                let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(norm > 1e-12, "layer {li} {t:?} {name}: zero gradient");
            }
        }
    }

    // Central finite differences on sampled coordinates of several matrices, on the same
    // architecture with f32 weights (quantized kernels round activations to 8 bits, which
    // makes finite differences meaningless; the backward code is the same).
    let model = Qwen2::random_with_dtype(&cfg, 1, &device, candle_core::quantized::GgmlDType::F32).unwrap();
    let mut prefix = KvCache::default();
    model.forward(&[5, 9, 17, 33], &mut prefix, 1).unwrap();
    let grads = loss(&model, &lora, &tokens, &prefix, &probe).backward().unwrap();
    let eps = 1e-2f32;
    let (mut analytic, mut numeric) = (Vec::new(), Vec::new());
    let picks: Vec<(usize, Target, bool)> = vec![
        (0, Target::Q, true),
        (0, Target::Down, false),
        (1, Target::V, true),
        (1, Target::Up, false),
        (0, Target::O, true),
    ];
    for (li, t, is_a) in picks {
        let p = &lora.layers[li][&t];
        let var: &Var = if is_a { &p.a } else { &p.b };
        let g: Vec<f32> = grads.get(var).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for k in [0usize, 5, 17, base.len() - 1] {
            let mut plus = base.clone();
            plus[k] += eps;
            var.set(&Tensor::from_vec(plus, var.shape(), &device).unwrap())
                .unwrap();
            let lp = loss(&model, &lora, &tokens, &prefix, &probe)
                .to_scalar::<f32>()
                .unwrap();
            let mut minus = base.clone();
            minus[k] -= eps;
            var.set(&Tensor::from_vec(minus, var.shape(), &device).unwrap())
                .unwrap();
            let lm = loss(&model, &lora, &tokens, &prefix, &probe)
                .to_scalar::<f32>()
                .unwrap();
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &device).unwrap())
                .unwrap();
            analytic.push(g[k] as f64);
            numeric.push(((lp - lm) / (2.0 * eps)) as f64);
        }
    }
    let dot: f64 = analytic.iter().zip(&numeric).map(|(a, b)| a * b).sum();
    let na: f64 = analytic.iter().map(|a| a * a).sum::<f64>().sqrt();
    let nb: f64 = numeric.iter().map(|b| b * b).sum::<f64>().sqrt();
    let cosine = dot / (na * nb);
    assert!(
        cosine > 0.999,
        "cosine {cosine}\nanalytic {analytic:?}\nnumeric {numeric:?}"
    );
    let rel = analytic
        .iter()
        .zip(&numeric)
        .map(|(a, b)| (a - b).abs())
        .sum::<f64>()
        / numeric.iter().map(|b| b.abs()).sum::<f64>();
    assert!(
        rel < 0.02,
        "mean relative error {rel}\nanalytic {analytic:?}\nnumeric {numeric:?}"
    );
}

#[test]
fn inference_with_the_adapter_gives_the_training_forwards_logits() {
    let device = Device::Cpu;
    let cfg = tiny();
    let model = Qwen2::random(&cfg, 2, &device).unwrap();
    let lora = adapter(&cfg, &device);
    let mut prefix = KvCache::default();
    model.forward(&[1, 2, 3, 4, 5], &mut prefix, 1).unwrap();
    let suffix = [10u32, 20, 30, 40];
    let train = model
        .forward_train(
            &Tensor::new(&[suffix], &device).unwrap(),
            Some(&prefix),
            Some(&lora),
            0,
            None,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut cache = prefix.clone();
    let infer = model
        .forward_with(&suffix, &mut cache, suffix.len(), Some(&lora))
        .unwrap();
    let diff = (&train - &infer)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = infer
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // Tolerance: 1e-3 of the largest logit (fused vs. composed kernels, f32).
    assert!(
        diff <= 1e-3 * scale.max(1.0),
        "max |Δlogit| {diff} (largest logit {scale})"
    );
    // And the adapter matters: without it the logits differ.
    let mut cache = prefix.clone();
    let base = model
        .forward_with(&suffix, &mut cache, suffix.len(), None)
        .unwrap();
    let moved = (&base - &infer)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 1e-2, "the adapter changed nothing ({moved})");
    assert_eq!(train.dtype(), DType::F32);
}

/// Per-layer recomputation and the chunked head are a memory optimisation only: the loss and
/// every adapter gradient equal those of back-propagating the whole graph at once (batch of
/// two, dropout on, head chunks that do not divide the answer span).
#[test]
fn checkpointed_gradients_equal_whole_graph_gradients() {
    let device = Device::Cpu;
    let cfg = tiny();
    let model = Qwen2::random(&cfg, 4, &device).unwrap();
    let lora = adapter(&cfg, &device);
    let mut prefix = KvCache::default();
    model.forward(&[5, 9, 17, 33], &mut prefix, 1).unwrap();
    let tokens = Tensor::new(&[[3u32, 7, 11, 2, 40, 41, 8], [6, 1, 90, 13, 12, 0, 0]], &device).unwrap();
    let from = 2;
    let probe = Tensor::randn(0f32, 1.0, (2, 5, cfg.vocab_size), &device).unwrap();
    let dropout = Some((0.3, 99));
    let whole = (model
        .forward_train(&tokens, Some(&prefix), Some(&lora), from, dropout)
        .unwrap()
        * &probe)
        .unwrap()
        .sum_all()
        .unwrap();
    let reference = whole.backward().unwrap();
    let chunk_loss = |logits: &Tensor, off: usize| {
        let c = logits.dim(1)?;
        (logits * probe.narrow(1, off, c)?)?.sum_all()
    };
    let (total, grads) = model
        .loss_and_grads(&tokens, Some(&prefix), &lora, from, dropout, 2, &chunk_loss)
        .unwrap();
    let expect = whole.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (total - expect).abs() <= 1e-4 * expect.abs().max(1.0),
        "loss {total} vs {expect}"
    );
    let mut checked = 0;
    for v in lora.vars() {
        let a = reference.get(v.as_tensor()).expect("reference gradient");
        let b = grads.get(v.as_tensor()).expect("checkpointed gradient");
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            diff <= 1e-4 * scale.max(1e-3),
            "gradient differs by {diff} (scale {scale})"
        );
        checked += 1;
    }
    assert_eq!(checked, 2 * 7 * cfg.num_layers);
}
