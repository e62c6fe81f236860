//! AdamW (decoupled weight decay, Loshchilov & Hutter), linear warmup then cosine decay, and
//! global-norm gradient clipping. Written out (candle-nn's AdamW keeps its moments private) so
//! checkpoints can store and restore the optimizer state exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::{candle, file_err, TrainError};

/// Hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Learning rate at optimizer step `step` (0-based): linear warmup over `warmup` steps, then
/// cosine decay to 10 % of the peak at `total`.
pub fn lr_at(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f64 / span as f64).min(1.0);
    let floor = 0.1 * peak;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// AdamW over a fixed list of variables.
pub struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken.
    pub step: usize,
    /// Hyper-parameters.
    pub config: AdamWConfig,
}

impl AdamW {
    /// Zero moments for `vars`.
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self, TrainError> {
        let zeros = |v: &Var| v.as_tensor().zeros_like().map_err(candle);
        let m = vars.iter().map(zeros).collect::<Result<_, _>>()?;
        let v = vars.iter().map(zeros).collect::<Result<_, _>>()?;
        Ok(AdamW {
            vars,
            m,
            v,
            step: 0,
            config,
        })
    }

    /// One update with gradients `grads` (same order as the variables) at learning rate `lr`.
    pub fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<(), TrainError> {
        let c = &self.config;
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (i, g) in grads.iter().enumerate() {
            let mut step = || -> candle_core::Result<()> {
                let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
                let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
                let w = self.vars[i].as_tensor();
                let next = ((w * (1.0 - lr * c.weight_decay))? - (update * lr)?)?;
                self.vars[i].set(&next)?;
                self.m[i] = m;
                self.v[i] = v;
                Ok(())
            };
            step().map_err(candle)?;
        }
        Ok(())
    }

    /// Writes the moments to a safetensors file (atomically).
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut map = HashMap::new();
        for i in 0..self.m.len() {
            map.insert(format!("m.{i}"), self.m[i].clone());
            map.insert(format!("v.{i}"), self.v[i].clone());
        }
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&map, &tmp).map_err(|e| file_err(path, e))?;
        std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
    }

    /// Restores moments written by [`AdamW::save`]; `step` comes from the checkpoint state.
    pub fn load(&mut self, path: &Path, step: usize, device: &Device) -> Result<(), TrainError> {
        let map = candle_core::safetensors::load(path, device).map_err(|e| file_err(path, e))?;
        for i in 0..self.m.len() {
            for (name, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let t = map.get(&format!("{name}.{i}")).ok_or_else(|| {
                    file_err(path, format!("missing {name}.{i}: not a checkpoint of this run"))
                })?;
                if t.dims() != slot.dims() {
                    return Err(file_err(
                        path,
                        format!("{name}.{i} has shape {:?}, expected {:?}", t.dims(), slot.dims()),
                    ));
                }
                *slot = t.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scales gradients in place so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, TrainError> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g
            .sqr()
            .and_then(|s| s.sum_all())
            .and_then(|s| s.to_scalar::<f32>())
            .map_err(candle)? as f64;
    }
    let norm = total.sqrt();
    if norm.is_finite() && norm > max_norm && max_norm > 0.0 {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale).map_err(candle)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_ten_percent() {
        assert!((lr_at(1.0, 0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(1.0, 9, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(1.0, 10, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(1.0, 100, 10, 100) - 0.1).abs() < 1e-12);
        assert!(lr_at(1.0, 55, 10, 100) < 0.6 && lr_at(1.0, 55, 10, 100) > 0.5);
    }

    #[test]
    fn adamw_minimises_a_quadratic_and_clipping_bounds_the_norm() {
        let dev = Device::Cpu;
        let x = Var::new(&[3.0f32, -2.0], &dev).unwrap();
        let mut opt = AdamW::new(
            vec![x.clone()],
            AdamWConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..300 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap().get(&x).unwrap().clone();
            opt.update(&[g], 0.1).unwrap();
        }
        let v: Vec<f32> = x.as_tensor().to_vec1().unwrap();
        assert!(v.iter().all(|a| a.abs() < 0.05), "{v:?}");
        let mut gs = vec![Tensor::new(&[3.0f32, 4.0], &dev).unwrap()];
        assert!((clip_grad_norm(&mut gs, 1.0).unwrap() - 5.0).abs() < 1e-6);
        let n: f32 = gs[0]
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((n - 1.0).abs() < 1e-3, "{n}");
    }
}
