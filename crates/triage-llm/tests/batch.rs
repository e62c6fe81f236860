//! Batched forward passes and the in-place KV cache: several sequences in one pass give each
//! sequence the logits it gets alone, a cache grown step by step equals one prefill, and a
//! truncated (rolled back) cache continues as if the dropped tokens never ran.

use candle_core::{DType, Device, Tensor};
use triage_llm::qwen2::{BatchItem, Config, KvCache, Qwen2, Seq};

fn model(dtype: candle_core::quantized::GgmlDType) -> Qwen2 {
    let cfg = Config {
        num_layers: 3,
        ..Config::tiny()
    };
    Qwen2::random_with_dtype(&cfg, 11, &Device::Cpu, dtype).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Three sequences at different lengths (one starting empty), some extending their cache
/// and two only reading one, in one pass: each item's logits equal running it alone.
#[test]
fn a_batched_pass_equals_each_sequence_alone() {
    // f32 projections: exact arithmetic, so any cross-talk between sequences would show.
    let m = model(candle_core::quantized::GgmlDType::F32);
    let mut a = KvCache::default();
    m.forward(&[1, 2, 3, 4, 5, 6, 7], &mut a, 1).unwrap();
    let mut b = KvCache::default();
    m.forward(&[9, 8], &mut b, 1).unwrap();
    let c = {
        let mut c = KvCache::default();
        m.forward(&[40, 41, 42], &mut c, 1).unwrap();
        c
    };

    // Alone.
    let mut a1 = a.fork(0).unwrap();
    let mut b1 = b.fork(0).unwrap();
    let want_a = rows(&m.forward(&[10, 11, 12], &mut a1, 2).unwrap());
    let want_b = rows(&m.forward(&[13], &mut b1, 1).unwrap());
    let want_new = rows(&m.forward(&[20, 21, 22, 23], &mut KvCache::default(), 4).unwrap());
    let want_p1 = rows(&m.forward(&[50, 51], &mut c.fork(0).unwrap(), 1).unwrap());
    let want_p2 = rows(&m.forward(&[60], &mut c.fork(0).unwrap(), 1).unwrap());

    // Together.
    let mut fresh = KvCache::default();
    let mut items = [
        BatchItem {
            tokens: &[10, 11, 12],
            seq: Seq::Extend(&mut a),
            n_logits: 2,
        },
        BatchItem {
            tokens: &[50, 51],
            seq: Seq::Peek(&c),
            n_logits: 1,
        },
        BatchItem {
            tokens: &[13],
            seq: Seq::Extend(&mut b),
            n_logits: 1,
        },
        BatchItem {
            tokens: &[20, 21, 22, 23],
            seq: Seq::Extend(&mut fresh),
            n_logits: 4,
        },
        BatchItem {
            tokens: &[60],
            seq: Seq::Peek(&c),
            n_logits: 1,
        },
    ];
    let got = m.forward_batch(&mut items, None).unwrap();
    let tol = 1e-4;
    assert!(max_abs_diff(&rows(&got[0]), &want_a) < tol);
    assert!(max_abs_diff(&rows(&got[1]), &want_p1) < tol);
    assert!(max_abs_diff(&rows(&got[2]), &want_b) < tol);
    assert!(max_abs_diff(&rows(&got[3]), &want_new) < tol);
    assert!(max_abs_diff(&rows(&got[4]), &want_p2) < tol);
    // Extended caches grew by their tokens; the read one did not.
    assert_eq!((a.len(), b.len(), fresh.len(), c.len()), (10, 3, 4, 3));

    // And the caches the batch extended continue exactly like the ones extended alone.
    let next_a = rows(&m.forward(&[14], &mut a, 1).unwrap());
    let next_a1 = rows(&m.forward(&[14], &mut a1, 1).unwrap());
    assert!(max_abs_diff(&next_a, &next_a1) < tol);
}

/// On the quantized kernels (8-bit activations, rounded per row), batching keeps each
/// sequence's greedy choice and its logits close.
#[test]
fn batching_on_quantized_weights_keeps_the_logits() {
    let m = model(candle_core::quantized::GgmlDType::Q8_0);
    let seqs: [&[u32]; 3] = [&[1, 2, 3], &[7, 7, 7, 7, 7], &[30]];
    let alone: Vec<Vec<Vec<f32>>> = seqs
        .iter()
        .map(|s| rows(&m.forward(s, &mut KvCache::default(), 1).unwrap()))
        .collect();
    let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::default()).collect();
    let mut items: Vec<BatchItem> = caches
        .iter_mut()
        .zip(seqs)
        .map(|(c, s)| BatchItem {
            tokens: s,
            seq: Seq::Extend(c),
            n_logits: 1,
        })
        .collect();
    let got = m.forward_batch(&mut items, None).unwrap();
    for (g, w) in got.iter().zip(&alone) {
        assert!(max_abs_diff(&rows(g), w) < 1e-3, "{}", max_abs_diff(&rows(g), w));
    }
}

/// A cache written one token at a time (growing its buffers past their first capacity)
/// holds what one prefill computes; truncating it drops a scored branch.
#[test]
fn the_cache_grows_in_place_and_rolls_back() {
    let m = model(candle_core::quantized::GgmlDType::F32);
    let tokens: Vec<u32> = (0..150).map(|i| (i * 7 % 90) as u32).collect();
    let mut step = KvCache::default();
    m.forward(&tokens[..3], &mut step, 1).unwrap();
    for t in &tokens[3..149] {
        m.forward(&[*t], &mut step, 1).unwrap();
    }
    let last_step = rows(&m.forward(&tokens[149..], &mut step, 1).unwrap());
    let all = rows(&m.forward(&tokens, &mut KvCache::default(), 1).unwrap());
    assert!(max_abs_diff(&last_step, &all) < 1e-4);

    // Branch: score a token, roll back, continue with another.
    let mut c = KvCache::default();
    m.forward(&tokens[..10], &mut c, 1).unwrap();
    m.forward(&[5, 6, 7], &mut c, 1).unwrap();
    c.truncate(10);
    assert_eq!(c.len(), 10);
    let after = rows(&m.forward(&[8], &mut c, 1).unwrap());
    let mut want_seq = tokens[..10].to_vec();
    want_seq.push(8);
    let want = rows(&m.forward(&want_seq, &mut KvCache::default(), 1).unwrap());
    assert!(max_abs_diff(&after, &want) < 1e-4);
}

/// The saved prefix cache is f16 and reads back as what `rounded_to_f16` gives.
#[test]
fn a_saved_cache_reads_back_rounded_to_f16() {
    let m = model(candle_core::quantized::GgmlDType::F32);
    let mut c = KvCache::default();
    m.forward(&[3, 1, 4, 1, 5, 9, 2, 6], &mut c, 1).unwrap();
    let dir = std::env::temp_dir().join(format!("triage-kv-{}", std::process::id()));
    let path = dir.join("prefix.safetensors");
    c.save(&path).unwrap();
    let bytes = std::fs::metadata(&path).unwrap().len();
    let cfg = m.config();
    let f32_bytes = (2 * cfg.num_layers * cfg.num_kv_heads * 8 * cfg.head_dim * 4) as u64;
    assert!(bytes < f32_bytes * 6 / 10, "{bytes} bytes: not f16");
    let mut loaded = KvCache::load(&path, cfg, 8, &Device::Cpu).unwrap();
    assert!(KvCache::load(&path, cfg, 9, &Device::Cpu).is_none());
    let mut rounded = c.rounded_to_f16().unwrap();
    let x = rows(&m.forward(&[7], &mut loaded, 1).unwrap());
    let y = rows(&m.forward(&[7], &mut rounded, 1).unwrap());
    assert_eq!(x, y);
    std::fs::remove_dir_all(dir).unwrap();
}
