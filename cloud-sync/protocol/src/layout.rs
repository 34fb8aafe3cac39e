//! Owns a model package's input tensor shape (`input.layout`,
//! `docs/model-package.md`) and the check of a graph's declared input
//! against it, so the agent (at load and hot swap) and the registry (at
//! upload) accept and refuse the same packages with the same words.

/// How an input row is shaped into the model's input tensor.
///
/// `fields` is the number of features, `window` the time steps per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `[batch, width]`: the row as the feature pipeline makes it (any
    /// transforms).
    #[default]
    Flat,
    /// `[batch, fields, window]`: one channel per feature, each holding the
    /// window in time order (PyTorch `Conv1d`). Per-sample transforms only.
    ChannelsFirst,
    /// `[batch, window, fields]`: one position per time step, each holding
    /// every feature (PyTorch GRU/LSTM with `batch_first=True`, Keras).
    /// Per-sample transforms only.
    ChannelsLast,
}

impl Layout {
    /// Parses a manifest name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "flat" => Self::Flat,
            "channels_first" => Self::ChannelsFirst,
            "channels_last" => Self::ChannelsLast,
            _ => return None,
        })
    }

    /// The manifest name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Flat => "flat",
            Self::ChannelsFirst => "channels_first",
            Self::ChannelsLast => "channels_last",
        }
    }
}

/// A declared input shape in words: `[?, 64, 1]`, `?` where symbolic.
#[must_use]
pub fn declared_text(declared: &[Option<i64>]) -> String {
    format!(
        "[{}]",
        declared
            .iter()
            .map(|d| d.map_or("?".to_owned(), |d| d.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The input a package feeds, without the batch dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputShape {
    /// How rows become the tensor.
    pub layout: Layout,
    /// Values per row.
    pub width: usize,
    /// Features (`[[input.features]]` entries); rank-3 layouts only.
    pub fields: usize,
    /// Time steps per window (`input.window`); rank-3 layouts only.
    pub window: usize,
}

impl InputShape {
    /// The tensor shape for `batch` rows.
    #[must_use]
    pub fn dims(self, batch: usize) -> Vec<usize> {
        match self.layout {
            Layout::Flat => vec![batch, self.width],
            Layout::ChannelsFirst => vec![batch, self.fields, self.window],
            Layout::ChannelsLast => vec![batch, self.window, self.fields],
        }
    }

    /// Appends one row (in feature order: every value of the first feature's
    /// window, then the next feature's) to `out` in the tensor's row-major
    /// order. Values missing from a short `row` are skipped.
    pub fn lay_out(self, row: &[f32], out: &mut Vec<f32>) {
        match self.layout {
            // Feature order is already `[fields][window]` row-major.
            Layout::Flat | Layout::ChannelsFirst => out.extend_from_slice(row),
            Layout::ChannelsLast => {
                for t in 0..self.window {
                    out.extend((0..self.fields).filter_map(|f| row.get(f * self.window + t)));
                }
            }
        }
    }

    /// What the manifest feeds, in words, for refusals.
    #[must_use]
    pub fn feeds(self) -> String {
        let (fields, window, width) = (self.fields, self.window, self.width);
        match self.layout {
            Layout::Flat => format!(
                "the manifest's features make rows of {width} values (input.layout = \"flat\" feeds [batch, {width}])"
            ),
            Layout::ChannelsFirst => format!(
                "input.layout = \"channels_first\" feeds [batch, {fields}, {window}] ({fields} feature(s) x window {window})"
            ),
            Layout::ChannelsLast => format!(
                "input.layout = \"channels_last\" feeds [batch, {window}, {fields}] (window {window} x {fields} feature(s))"
            ),
        }
    }

    /// Checks a graph's declared input against this shape: its rank (unless
    /// the graph leaves the rank open), every fixed non-batch dimension, and
    /// a fixed batch dimension against `batch` when given. `declared` holds
    /// each dimension, `None` where it is symbolic.
    ///
    /// # Errors
    /// A sentence naming the graph input (`input_name`), its declared shape
    /// and what the manifest feeds.
    pub fn check_declared(
        self,
        input_name: &str,
        declared: &[Option<i64>],
        rank_open: bool,
        batch: Option<usize>,
    ) -> Result<(), String> {
        let text = declared_text(declared);
        let want = self.dims(batch.unwrap_or(1));
        let refuse = |fed: String| format!("graph input {input_name:?} is {text}, {fed}");
        if !rank_open && declared.len() != want.len() {
            let mut fed = self.feeds();
            if self.layout == Layout::Flat && declared.len() == 3 {
                fed.push_str("; a rank-3 input needs \"channels_first\" or \"channels_last\"");
            }
            return Err(refuse(fed));
        }
        for (d, w) in declared.iter().zip(&want).skip(1) {
            if let Some(d) = d
                && usize::try_from(*d).ok() != Some(*w)
            {
                return Err(refuse(self.feeds()));
            }
        }
        if let (Some(rows), Some(Some(first))) = (batch, declared.first())
            && usize::try_from(*first).ok() != Some(rows)
        {
            return Err(format!(
                "graph input {input_name:?} is {text}: its batch dimension is fixed, input.batch_size must match it"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn shape(layout: Layout) -> InputShape {
        InputShape {
            layout,
            width: 64,
            fields: 1,
            window: 64,
        }
    }

    /// Without the transpose an LSTM would see every step's features
    /// scrambled.
    #[test]
    fn channels_last_rows_are_transposed() {
        let last = InputShape {
            layout: Layout::ChannelsLast,
            width: 6,
            fields: 2,
            window: 3,
        };
        // Feature order: a0 a1 a2 b0 b1 b2 -> steps (a0 b0) (a1 b1) (a2 b2).
        let mut out = Vec::new();
        last.lay_out(&[1.0, 2.0, 3.0, 10.0, 20.0, 30.0], &mut out);
        assert_eq!(out, [1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
        let first = InputShape {
            layout: Layout::ChannelsFirst,
            ..last
        };
        out.clear();
        first.lay_out(&[1.0, 2.0, 3.0], &mut out);
        assert_eq!(out, [1.0, 2.0, 3.0]);
    }

    #[test]
    fn names_round_trip() {
        for l in [Layout::Flat, Layout::ChannelsFirst, Layout::ChannelsLast] {
            assert_eq!(Layout::parse(l.name()), Some(l));
        }
        assert_eq!(Layout::parse("nchw"), None);
    }

    #[test]
    fn declared_inputs_are_checked_per_layout() {
        let last = shape(Layout::ChannelsLast);
        assert_eq!(last.dims(4), [4, 64, 1]);
        assert!(
            last.check_declared("x", &[None, Some(64), Some(1)], false, Some(4))
                .is_ok()
        );
        // Symbolic dimensions and an open rank accept anything.
        assert!(
            last.check_declared("x", &[None, None, None], false, None)
                .is_ok()
        );
        assert!(last.check_declared("x", &[], true, None).is_ok());
        let flipped = last
            .check_declared("x", &[None, Some(1), Some(64)], false, None)
            .unwrap_err();
        assert_eq!(
            flipped,
            "graph input \"x\" is [?, 1, 64], input.layout = \"channels_last\" feeds [batch, 64, 1] (window 64 x 1 feature(s))"
        );
        let flat = shape(Layout::Flat)
            .check_declared("x", &[None, Some(1), Some(64)], false, None)
            .unwrap_err();
        assert!(
            flat.ends_with("a rank-3 input needs \"channels_first\" or \"channels_last\""),
            "{flat}"
        );
        let narrow = shape(Layout::Flat)
            .check_declared("x", &[None, Some(12)], false, None)
            .unwrap_err();
        assert!(narrow.contains("make rows of 64 values"), "{narrow}");
        let batch = shape(Layout::Flat)
            .check_declared("x", &[Some(1), Some(64)], false, Some(8))
            .unwrap_err();
        assert!(batch.contains("input.batch_size must match"), "{batch}");
        assert!(
            shape(Layout::Flat)
                .check_declared("x", &[Some(8), Some(64)], false, Some(8))
                .is_ok()
        );
    }
}
