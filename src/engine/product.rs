//! Card products (protocol 1.3, PROTOCOL.md 6.12): the table of limits and deposits per
//! product id, what a card carries of its product (id, deposit, today's counters), and the UTC
//! day the daily limits count in. Decisions read them; journal entries of version 4 carry the
//! card's product fields after the operation, so replay sets them without deciding anything.

use citycard_protocol::Amount;

/// Most products a server knows (ids 0..MAX_PRODUCTS). A city has a handful (anonymous,
/// registered, student, senior, staff); a small fixed table keeps the lookup a direct index,
/// the whole table a few kilobytes copied with the limits, and the config reviewable by eye.
pub const MAX_PRODUCTS: usize = 32;
/// Longest product name in the config (shown by the counter console and reports).
pub const MAX_PRODUCT_NAME: usize = 32;
/// Length of the day the daily limits count in: a UTC day of the server's decision time.
pub const DAY_MS: u64 = 86_400_000;

/// What Replace does with the old card's deposit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplaceDeposit {
    /// The deposit moves to the new card; no money changes hands.
    Move,
    /// The operator keeps the old card's deposit (the card is not handed back, e.g. lost) and
    /// the holder pays the product's deposit for the new card.
    Keep,
}

/// One product's rules (a config table entry; product 0 defaults to the server-wide limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Product {
    /// Highest balance a card of the product may hold online (top-ups above: BalanceLimit).
    pub max_balance: i64,
    /// Highest amount of one online purchase or top-up (above: TransactionLimit).
    pub max_amount: i64,
    /// Most money spent online per UTC day (purchases, tap-out and expiry fares; None: none).
    pub daily_amount_limit: Option<i64>,
    /// Most online debits per UTC day (purchases and tap-ins; None: none).
    pub daily_count_limit: Option<u32>,
    /// The hold a tap-in places for a card of this product.
    pub max_fare: i64,
    /// The refundable card deposit, paid apart from the balance.
    pub deposit: i64,
    pub replace_deposit: ReplaceDeposit,
}

impl Product {
    /// Whether the product has a daily limit, so its debits keep the day's counters.
    pub fn has_daily_limit(&self) -> bool {
        self.daily_amount_limit.is_some() || self.daily_count_limit.is_some()
    }
}

/// The configured products by id. Product 0 is built in: absent from the table, it is the
/// server-wide limits (`max_balance`, `max_amount`, `max_fare`), no daily limits, no deposit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Products {
    table: [Option<Product>; MAX_PRODUCTS],
}

impl Default for Products {
    fn default() -> Self {
        Products { table: [None; MAX_PRODUCTS] }
    }
}

impl Products {
    /// Sets product `id` (the config checks the id and values first).
    pub fn set(&mut self, id: u8, product: Product) {
        if let Some(slot) = self.table.get_mut(usize::from(id)) {
            *slot = Some(product);
        }
    }

    /// Product `id` as configured; None when the table does not have it (product 0: see
    /// [`super::types::Limits::product`]).
    pub fn configured(&self, id: u8) -> Option<Product> {
        self.table.get(usize::from(id)).copied().flatten()
    }
}

/// A card's daily counters: the UTC day (days since 1970-01-01) they count, the money spent
/// online that day and the number of online debits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Daily {
    pub day: u32,
    pub amount: i64,
    pub count: u32,
}

impl Daily {
    pub const NONE: Daily = Daily { day: 0, amount: 0, count: 0 };

    /// The counters as of `now_ms`: these if they count today, else zero for today.
    pub fn today(self, now_ms: u64) -> Daily {
        let day = day_of(now_ms);
        if self.day == day {
            self
        } else {
            Daily { day, amount: 0, count: 0 }
        }
    }
}

/// The UTC day of a Unix ms time (saturating: a time past year 11 million counts as its last).
pub fn day_of(time_ms: u64) -> u32 {
    u32::try_from(time_ms / DAY_MS).unwrap_or(u32::MAX)
}

/// What a card record carries of its product (protocol 1.3). A card of product 0 without a
/// deposit and without counters is `CardProduct::DEFAULT`, and its stored bytes are those of
/// before products existed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CardProduct {
    pub id: u8,
    /// The refundable deposit held for the card, apart from its balance (>= 0).
    pub deposit: Amount,
    pub daily: Daily,
}

impl CardProduct {
    pub const DEFAULT: CardProduct = CardProduct { id: 0, deposit: Amount(0), daily: Daily::NONE };
}

/// The product fields a version 4 journal entry carries: the card's product state after the
/// operation and the deposit money that changed hands at the counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProductFields {
    /// `card_id`'s product, deposit and counters after the operation. Replace: the old card's
    /// (deposit 0); the new card gets the same product id, the deposit
    /// `old deposit - deposit_kept + deposit_paid` and no counters.
    pub after: CardProduct,
    /// Deposit money taken from the holder by this operation (>= 0).
    pub deposit_paid: i64,
    /// Deposit money paid out to the holder (>= 0).
    pub deposit_refunded: i64,
    /// Replace under [`ReplaceDeposit::Keep`]: the old card's deposit the operator keeps.
    pub deposit_kept: i64,
}

impl ProductFields {
    /// Encoded length: id u8, deposit i64, day u32, amount i64, count u32, paid, refunded and
    /// kept i64.
    pub const LEN: usize = 1 + 8 + 4 + 8 + 4 + 8 + 8 + 8;

    /// Fields that only carry the card's product state (no money at the counter).
    pub fn state(after: CardProduct) -> ProductFields {
        ProductFields { after, deposit_paid: 0, deposit_refunded: 0, deposit_kept: 0 }
    }

    pub fn to_bytes(self) -> [u8; ProductFields::LEN] {
        let mut out = [0u8; ProductFields::LEN];
        out[0] = self.after.id;
        out[1..9].copy_from_slice(&self.after.deposit.0.to_be_bytes());
        out[9..13].copy_from_slice(&self.after.daily.day.to_be_bytes());
        out[13..21].copy_from_slice(&self.after.daily.amount.to_be_bytes());
        out[21..25].copy_from_slice(&self.after.daily.count.to_be_bytes());
        out[25..33].copy_from_slice(&self.deposit_paid.to_be_bytes());
        out[33..41].copy_from_slice(&self.deposit_refunded.to_be_bytes());
        out[41..49].copy_from_slice(&self.deposit_kept.to_be_bytes());
        out
    }

    pub fn from_bytes(b: &[u8]) -> Option<ProductFields> {
        let b: &[u8; ProductFields::LEN] = b.try_into().ok()?;
        let i64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            i64::from_be_bytes(a)
        };
        let u32_at = |at: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[at..at + 4]);
            u32::from_be_bytes(a)
        };
        Some(ProductFields {
            after: CardProduct {
                id: b[0],
                deposit: Amount(i64_at(1)),
                daily: Daily { day: u32_at(9), amount: i64_at(13), count: u32_at(21) },
            },
            deposit_paid: i64_at(25),
            deposit_refunded: i64_at(33),
            deposit_kept: i64_at(41),
        })
    }

    /// The rules the fields hold on their own.
    pub fn check(&self) -> Result<(), &'static str> {
        if usize::from(self.after.id) >= MAX_PRODUCTS {
            return Err("product id beyond the product table");
        }
        if self.after.deposit.0 < 0
            || self.deposit_paid < 0
            || self.deposit_refunded < 0
            || self.deposit_kept < 0
        {
            return Err("deposits and deposit movements are never negative");
        }
        if self.after.daily.amount < 0 {
            return Err("a day's spending is never negative");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_days_and_counters_reset_at_midnight() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(DAY_MS - 1), 0);
        assert_eq!(day_of(DAY_MS), 1);
        let today = Daily { day: day_of(5 * DAY_MS + 10), amount: 700, count: 3 };
        assert_eq!(today.today(5 * DAY_MS + 999), today);
        assert_eq!(today.today(6 * DAY_MS), Daily { day: 6, amount: 0, count: 0 });
    }

    #[test]
    fn product_fields_round_trip_and_check() {
        let fields = ProductFields {
            after: CardProduct {
                id: 3,
                deposit: Amount(2_000),
                daily: Daily { day: 20_000, amount: 1_234, count: 7 },
            },
            deposit_paid: 500,
            deposit_refunded: 0,
            deposit_kept: 1,
        };
        assert_eq!(ProductFields::from_bytes(&fields.to_bytes()), Some(fields));
        assert!(ProductFields::from_bytes(&fields.to_bytes()[1..]).is_none());
        assert_eq!(fields.check(), Ok(()));
        let beyond = ProductFields {
            after: CardProduct { id: MAX_PRODUCTS as u8, ..fields.after },
            ..fields
        };
        assert!(beyond.check().is_err());
        assert!(ProductFields { deposit_refunded: -1, ..fields }.check().is_err());
    }
}
