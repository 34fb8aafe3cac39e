//! Feature windows: cuts one source's sequence of time steps into
//! fixed-length windows every `hop` steps. Pure state machine, no I/O.

use std::collections::VecDeque;

/// A window ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Window<T = f32> {
    /// Time steps, oldest first; exactly `window` of them.
    pub values: Vec<T>,
    /// Sequence number of the last reading.
    pub end_seq: u64,
    /// Device timestamp of the last reading.
    pub end_ts_ms: Option<i64>,
}

/// Sliding window state for one model and one source.
///
/// The first window closes at the `window`-th reading, then one every `hop`
/// readings, so with `window = 12, hop = 6` windows end at readings 12, 18,
/// 24, ... exactly as the training script cuts them.
#[derive(Debug, Clone)]
pub struct Windower<T = f32> {
    window: usize,
    hop: usize,
    values: VecDeque<T>,
    seen: u64,
}

impl<T: Clone> Windower<T> {
    /// A windower; `window >= 1` and `1 <= hop` (validated by the package).
    #[must_use]
    pub fn new(window: usize, hop: usize) -> Self {
        Self {
            window: window.max(1),
            hop: hop.max(1),
            values: VecDeque::with_capacity(window.max(1)),
            seen: 0,
        }
    }

    /// Adds a reading; returns a window when one closes.
    pub fn push(&mut self, value: T, seq: u64, ts_ms: Option<i64>) -> Option<Window<T>> {
        if self.values.len() == self.window {
            self.values.pop_front();
        }
        self.values.push_back(value);
        self.seen += 1;
        let w = self.window as u64;
        if self.seen >= w && (self.seen - w).is_multiple_of(self.hop as u64) {
            return Some(Window {
                values: self.values.iter().cloned().collect(),
                end_seq: seq,
                end_ts_ms: ts_ms,
            });
        }
        None
    }

    /// Forgets every step: the next window closes `window` steps from now.
    pub fn reset(&mut self) {
        self.values.clear();
        self.seen = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn windows_close_at_window_then_every_hop() {
        let mut w = Windower::new(3, 2);
        let ends: Vec<u64> = (1..=9)
            .filter_map(|i| w.push(i as f32, i, None).map(|x| x.end_seq))
            .collect();
        assert_eq!(ends, vec![3, 5, 7, 9]);
        let mut w = Windower::new(3, 2);
        let last = (1..=5).filter_map(|i| w.push(i as f32, i, Some(10))).last();
        assert_eq!(
            last,
            Some(Window {
                values: vec![3.0, 4.0, 5.0],
                end_seq: 5,
                end_ts_ms: Some(10)
            })
        );
    }

    proptest! {
        #[test]
        fn window_count_and_contents(window in 1usize..20, hop_frac in 0.0f64..1.0, n in 0u64..200) {
            let hop = 1 + ((window - 1) as f64 * hop_frac) as usize;
            let mut w = Windower::new(window, hop);
            let mut count = 0u64;
            for i in 1..=n {
                if let Some(x) = w.push(i as f32, i, None) {
                    count += 1;
                    prop_assert_eq!(x.values.len(), window);
                    prop_assert_eq!(x.values[window - 1], i as f32);
                    prop_assert_eq!(x.values[0], (i + 1 - window as u64) as f32);
                }
            }
            let expected = if n < window as u64 { 0 } else { (n - window as u64) / hop as u64 + 1 };
            prop_assert_eq!(count, expected);
        }
    }
}
