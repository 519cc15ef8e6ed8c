//! What a worker sends: the card operations, their weights in the mix, and the seeded random
//! choices (operation, card, amount, nonce) that make a run repeatable.

use citycard_protocol::MessageType;

/// The default operation mix.
pub const DEFAULT_MIX: &str = "purchase=80,balance=15,topup=4,identity=1";

/// A card operation of the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Purchase,
    Balance,
    TopUp,
    Identity,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Purchase, Op::Balance, Op::TopUp, Op::Identity];

    pub fn name(self) -> &'static str {
        match self {
            Op::Purchase => "purchase",
            Op::Balance => "balance",
            Op::TopUp => "topup",
            Op::Identity => "identity",
        }
    }

    pub fn request_type(self) -> MessageType {
        match self {
            Op::Purchase => MessageType::Purchase,
            Op::Balance => MessageType::Balance,
            Op::TopUp => MessageType::TopUp,
            Op::Identity => MessageType::Identity,
        }
    }

    /// Top-ups and identity go over the kiosk connection (readers may not send them).
    pub fn on_kiosk(self) -> bool {
        matches!(self, Op::TopUp | Op::Identity)
    }

    /// Balance is a read: its ATC must be above the card's last one but is not used up.
    pub fn consumes_atc(self) -> bool {
        !matches!(self, Op::Balance)
    }

    /// Balance change if the request is approved.
    pub fn delta(self, amount: i64) -> i64 {
        match self {
            Op::Purchase => -amount,
            Op::TopUp => amount,
            Op::Balance | Op::Identity => 0,
        }
    }
}

/// Relative weights of the operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: [u32; 4],
}

impl Mix {
    /// Parses `name=weight,...` with names purchase, balance, topup (or top-up), identity;
    /// unnamed operations get weight 0.
    pub fn parse(text: &str) -> Result<Mix, String> {
        let mut weights = [0u32; 4];
        let mut seen = [false; 4];
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) =
                part.split_once('=').ok_or_else(|| format!("`{part}`: expected NAME=WEIGHT"))?;
            let index = match name.trim().to_ascii_lowercase().as_str() {
                "purchase" => 0,
                "balance" => 1,
                "topup" | "top-up" => 2,
                "identity" => 3,
                other => {
                    return Err(format!(
                        "unknown operation `{other}` (purchase, balance, topup, identity)"
                    ))
                }
            };
            if seen[index] {
                return Err(format!("`{}` given twice", name.trim()));
            }
            seen[index] = true;
            weights[index] =
                weight.trim().parse().map_err(|e| format!("weight of `{}`: {e}", name.trim()))?;
        }
        if weights.iter().all(|w| *w == 0) {
            return Err("the mix needs at least one operation with a positive weight".into());
        }
        if weights.iter().map(|w| u64::from(*w)).sum::<u64>() > u64::from(u32::MAX) {
            return Err("weights too large".into());
        }
        Ok(Mix { weights })
    }

    pub fn weight(&self, op: Op) -> u32 {
        self.weights[op as usize]
    }

    fn total(&self) -> u64 {
        self.weights.iter().map(|w| u64::from(*w)).sum()
    }

    /// The operation for a uniformly random `r`.
    pub fn pick(&self, r: u64) -> Op {
        let mut x = r % self.total().max(1);
        for op in Op::ALL {
            let w = u64::from(self.weight(op));
            if x < w {
                return op;
            }
            x -= w;
        }
        Op::Purchase
    }

    pub fn needs_kiosk(&self) -> bool {
        self.weight(Op::TopUp) > 0 || self.weight(Op::Identity) > 0
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = Op::ALL
            .iter()
            .filter(|op| self.weight(**op) > 0)
            .map(|op| format!("{}={}", op.name(), self.weight(*op)))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// splitmix64: small, fast, deterministic for a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0), by multiply-high.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: i64, hi: i64) -> i64 {
        let span = (hi - lo).max(0) as u64 + 1;
        lo + self.below(span) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_the_default_and_picks_by_weight() {
        let mix = Mix::parse(DEFAULT_MIX).expect("default mix");
        assert_eq!(mix.weight(Op::Purchase), 80);
        assert_eq!(mix.weight(Op::Balance), 15);
        assert_eq!(mix.weight(Op::TopUp), 4);
        assert_eq!(mix.weight(Op::Identity), 1);
        assert_eq!(mix.to_string(), DEFAULT_MIX);
        assert_eq!(mix.pick(0), Op::Purchase);
        assert_eq!(mix.pick(79), Op::Purchase);
        assert_eq!(mix.pick(80), Op::Balance);
        assert_eq!(mix.pick(95), Op::TopUp);
        assert_eq!(mix.pick(99), Op::Identity);
        assert_eq!(mix.pick(100), Op::Purchase);
        assert!(mix.needs_kiosk());
    }

    #[test]
    fn mix_accepts_partial_mixes_and_rejects_nonsense() {
        let mix = Mix::parse(" purchase = 1 , top-up=3").expect("partial mix");
        assert_eq!(mix.weight(Op::Balance), 0);
        assert_eq!(mix.weight(Op::TopUp), 3);
        assert_eq!(mix.to_string(), "purchase=1,topup=3");
        assert!(!Mix::parse("balance=5").expect("reads only").needs_kiosk());
        assert!(Mix::parse("").is_err());
        assert!(Mix::parse("purchase=0").is_err());
        assert!(Mix::parse("refund=3").is_err());
        assert!(Mix::parse("purchase").is_err());
        assert!(Mix::parse("purchase=-1").is_err());
        assert!(Mix::parse("purchase=1,purchase=2").is_err());
    }

    #[test]
    fn mix_frequencies_follow_weights() {
        let mix = Mix::parse(DEFAULT_MIX).expect("mix");
        let mut rng = Rng::new(7);
        let mut counts = [0u32; 4];
        for _ in 0..100_000 {
            counts[mix.pick(rng.next_u64()) as usize] += 1;
        }
        assert!((79_000..81_000).contains(&counts[0]), "{counts:?}");
        assert!((14_300..15_700).contains(&counts[1]), "{counts:?}");
        assert!((3_600..4_400).contains(&counts[2]), "{counts:?}");
        assert!((800..1_200).contains(&counts[3]), "{counts:?}");
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let x = a.between(1, 300);
            assert!((1..=300).contains(&x));
            b.between(1, 300);
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }
}
