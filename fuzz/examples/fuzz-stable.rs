//! The fuzz targets on the stable toolchain, without libFuzzer: random inputs (fresh random
//! bytes, and random mutations of well-formed ones) for a bounded time. No coverage guidance,
//! so it finds less than `cargo fuzz`, but it runs anywhere.
//!
//! ```text
//! cargo run --release --manifest-path fuzz/Cargo.toml --no-default-features --example fuzz-stable -- [envelope|state_machine|all] [seconds]
//! ```
//! `FUZZ_SEED=<n>` replays a run. On a failure it prints the target, the seed and the input
//! (hex), and exits 1.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// xorshift64*: enough randomness for this, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next().to_le_bytes()[0]).collect()
    }
}

/// A few random edits of `seed`: byte changes, cuts, insertions, duplicated spans.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] = rng.next().to_le_bytes()[0];
            }
            1 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] ^= 1 << rng.below(8);
            }
            2 => out.truncate(rng.below(out.len() + 1)),
            3 => {
                let at = rng.below(out.len() + 1);
                let len = rng.below(8) + 1;
                let insert = rng.bytes(len);
                out.splice(at..at, insert);
            }
            _ if out.len() > 2 => {
                let from = rng.below(out.len() - 1);
                let to = from + 1 + rng.below(out.len() - from - 1);
                let span = out[from..to].to_vec();
                let at = rng.below(out.len() + 1);
                out.splice(at..at, span);
            }
            _ => {}
        }
    }
    out
}

fn run(
    name: &str,
    target: fn(&[u8]) -> &'static str,
    seeds: &[Vec<u8>],
    budget: Duration,
    seed: u64,
) -> u64 {
    let mut rng = Rng(seed | 1);
    let start = Instant::now();
    let mut runs = 0u64;
    let mut outcomes = std::collections::BTreeMap::<&str, u64>::new();
    while start.elapsed() < budget {
        let input = if !seeds.is_empty() && rng.below(2) == 0 {
            let base = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, base)
        } else {
            let len = rng.below(512);
            rng.bytes(len)
        };
        let Ok(outcome) = catch_unwind(AssertUnwindSafe(|| target(&input))) else {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!(
                "{name}: FAILED after {runs} runs (FUZZ_SEED={seed}); input ({} bytes): {hex}",
                input.len()
            );
            std::process::exit(1);
        };
        *outcomes.entry(outcome).or_default() += 1;
        runs += 1;
    }
    println!(
        "{name}: {runs} inputs in {:?}, no failure (FUZZ_SEED={seed}); outcomes {outcomes:?}",
        start.elapsed()
    );
    runs
}

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "all".to_owned());
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    // Panics are caught and reported with the input; the default hook's message still shows
    // what failed.
    let targets: Vec<(&str, fn(&[u8]) -> &'static str, Vec<Vec<u8>>)> = vec![
        (
            "envelope",
            yeongye_fuzz::envelope_outcome,
            yeongye_fuzz::envelope_seeds(),
        ),
        (
            "state_machine",
            |data| {
                yeongye_fuzz::state_machine(data);
                "ok"
            },
            Vec::new(),
        ),
    ];
    let chosen: Vec<_> = targets
        .into_iter()
        .filter(|(name, _, _)| which == "all" || which == *name)
        .collect();
    if chosen.is_empty() {
        eprintln!("usage: fuzz-stable [envelope|state_machine|all] [seconds]");
        std::process::exit(2);
    }
    // The well-formed seeds must get past the envelope checks, or mutating them is pointless.
    for seed in yeongye_fuzz::envelope_seeds() {
        let outcome = yeongye_fuzz::envelope_outcome(&seed);
        assert_eq!(outcome, "applied", "a seed input is not applied");
    }
    let budget = Duration::from_secs(secs) / u32::try_from(chosen.len()).unwrap_or(1);
    for (name, target, seeds) in &chosen {
        run(name, *target, seeds, budget, seed);
    }
}
