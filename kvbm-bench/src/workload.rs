//! The built-in synthetic workload: multi-turn conversations that share a few system
//! prompts of skewed (Zipf) popularity. Each turn's prompt is the conversation so far (its
//! own earlier prompts and answers) plus a new user message, so it extends its own prefix.

use crate::trace::Request;

/// Shape of the synthetic workload.
#[derive(Clone, Copy, Debug)]
pub struct Synthetic {
    /// Conversations.
    pub sessions: usize,
    /// Turns per conversation, at most (each has 1..=this).
    pub max_turns: usize,
    /// Distinct system prompts.
    pub system_prompts: usize,
    /// Zipf exponent of system prompt popularity.
    pub zipf: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for Synthetic {
    fn default() -> Self {
        Self {
            sessions: 2000,
            max_turns: 8,
            system_prompts: 32,
            zipf: 1.1,
            seed: 1,
        }
    }
}

/// splitmix64: reproducible, dependency-free.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Synthetic {
    /// The requests, in arrival order.
    ///
    /// ```
    /// let w = kvbm_bench::workload::Synthetic { sessions: 3, max_turns: 2, ..Default::default() };
    /// let requests = w.generate();
    /// assert!(requests.len() >= 3 && requests.len() <= 6);
    /// ```
    pub fn generate(&self) -> Vec<Request> {
        let mut rng = Rng(self.seed);
        let mut next_id = 0u64;
        let mut fresh = |n: usize| -> Vec<u64> {
            let ids = (next_id..next_id + n as u64).collect();
            next_id += n as u64;
            ids
        };
        let prompts: Vec<Vec<u64>> = (0..self.system_prompts.max(1))
            .map(|_| fresh(rng.range(2, 8)))
            .collect();
        // Zipf CDF over the prompts.
        let weights: Vec<f64> = (1..=prompts.len())
            .map(|k| 1.0 / (k as f64).powf(self.zipf))
            .collect();
        let total: f64 = weights.iter().sum();
        let cdf: Vec<f64> = weights
            .iter()
            .scan(0.0, |acc, w| {
                *acc += w / total;
                Some(*acc)
            })
            .collect();
        // (history, turns left)
        let mut live: Vec<(Vec<u64>, usize)> = (0..self.sessions)
            .map(|_| {
                let u = rng.unit();
                let p = cdf.iter().position(|&c| u < c).unwrap_or(prompts.len() - 1);
                (prompts[p].clone(), rng.range(1, self.max_turns.max(1)))
            })
            .collect();
        let mut requests = Vec::new();
        while !live.is_empty() {
            let pick = rng.range(0, live.len() - 1);
            let (history, left) = &mut live[pick];
            history.extend(fresh(rng.range(1, 3))); // the user's message
            requests.push(Request {
                hash_ids: history.clone(),
            });
            history.extend(fresh(rng.range(0, 2))); // the answer
            *left -= 1;
            if *left == 0 {
                live.swap_remove(pick);
            }
        }
        requests
    }
}
