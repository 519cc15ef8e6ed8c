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
    /// Protocol 1.2: a hold at an entry gate (a card with an open hold taps out instead).
    TapIn,
    /// Protocol 1.2: completes the card's hold (a card without one taps in instead).
    TapOut,
    /// Protocol 1.2: asks for the answer to the card's last answered consuming request.
    Inquiry,
    /// Protocol 1.2: reverses the card's last approved purchase of this reader (a card without
    /// one makes a purchase instead).
    Reversal,
}

/// Operations in mix order.
const COUNT: usize = 8;

impl Op {
    pub const ALL: [Op; COUNT] = [
        Op::Purchase,
        Op::Balance,
        Op::TopUp,
        Op::Identity,
        Op::TapIn,
        Op::TapOut,
        Op::Inquiry,
        Op::Reversal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Purchase => "purchase",
            Op::Balance => "balance",
            Op::TopUp => "topup",
            Op::Identity => "identity",
            Op::TapIn => "tapin",
            Op::TapOut => "tapout",
            Op::Inquiry => "inquiry",
            Op::Reversal => "reversal",
        }
    }

    pub fn request_type(self) -> MessageType {
        match self {
            Op::Purchase => MessageType::Purchase,
            Op::Balance => MessageType::Balance,
            Op::TopUp => MessageType::TopUp,
            Op::Identity => MessageType::Identity,
            Op::TapIn => MessageType::TapIn,
            Op::TapOut => MessageType::TapOut,
            Op::Inquiry => MessageType::Inquiry,
            Op::Reversal => MessageType::Reversal,
        }
    }

    /// The protocol 1.2 operations (the floor server does not answer them).
    pub fn transit(self) -> bool {
        matches!(self, Op::TapIn | Op::TapOut | Op::Inquiry | Op::Reversal)
    }

    /// Top-ups and identity go over the kiosk connection (readers may not send them).
    pub fn on_kiosk(self) -> bool {
        matches!(self, Op::TopUp | Op::Identity)
    }

    /// Balance is a read: its ATC must be above the card's last one but is not used up. An
    /// inquiry carries the ATC of the request it asks about.
    pub fn consumes_atc(self) -> bool {
        !matches!(self, Op::Balance | Op::Inquiry)
    }

    /// Balance change if the request is approved (a tap-out's amount is its fare, a reversal's
    /// the refund).
    pub fn delta(self, amount: i64) -> i64 {
        match self {
            Op::Purchase | Op::TapOut => -amount,
            Op::TopUp | Op::Reversal => amount,
            Op::Balance | Op::Identity | Op::TapIn | Op::Inquiry => 0,
        }
    }
}

/// Relative weights of the operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: [u32; COUNT],
}

impl Mix {
    /// Parses `name=weight,...` with names purchase, balance, topup (or top-up), identity,
    /// tapin, tapout, inquiry, reversal; unnamed operations get weight 0.
    pub fn parse(text: &str) -> Result<Mix, String> {
        let mut weights = [0u32; COUNT];
        let mut seen = [false; COUNT];
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) =
                part.split_once('=').ok_or_else(|| format!("`{part}`: expected NAME=WEIGHT"))?;
            let index = match name.trim().to_ascii_lowercase().as_str() {
                "purchase" => 0,
                "balance" => 1,
                "topup" | "top-up" => 2,
                "identity" => 3,
                "tapin" | "tap-in" => 4,
                "tapout" | "tap-out" => 5,
                "inquiry" => 6,
                "reversal" => 7,
                other => {
                    return Err(format!(
                        "unknown operation `{other}` (purchase, balance, topup, identity, \
                         tapin, tapout, inquiry, reversal)"
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

    /// Whether the mix has protocol 1.2 operations.
    pub fn has_transit(&self) -> bool {
        Op::ALL.iter().any(|op| op.transit() && self.weight(*op) > 0)
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
        let transit = Mix::parse("tapin=5,tap-out=5,inquiry=1,reversal=1").expect("transit mix");
        assert_eq!(transit.to_string(), "tapin=5,tapout=5,inquiry=1,reversal=1");
        assert!(transit.has_transit() && !transit.needs_kiosk());
        assert!(!Mix::parse(DEFAULT_MIX).expect("default").has_transit());
        assert!(Mix::parse("purchase").is_err());
        assert!(Mix::parse("purchase=-1").is_err());
        assert!(Mix::parse("purchase=1,purchase=2").is_err());
    }

    #[test]
    fn mix_frequencies_follow_weights() {
        let mix = Mix::parse(DEFAULT_MIX).expect("mix");
        let mut rng = Rng::new(7);
        let mut counts = [0u32; COUNT];
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
