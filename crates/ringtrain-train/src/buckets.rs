//! Gradient buckets for the all-reduce, filled while backward runs, and sparse embedding rows.

use ringtrain_autograd::ParamGrad;
use ringtrain_config::SparseEmbeddings;

use crate::sync::{GradSync, SyncError};
use crate::Result;

/// A step's gradient cut into buckets for the all-reduce: whole parameters in the order
/// backward finishes them ([`Graph::backward_order`]), a bucket closed once it holds
/// `bucket_elems` elements. Every rank builds the same plan from the same model.
#[derive(Debug)]
pub(crate) struct GradBuckets {
    /// Per parameter of the store: its bucket and its offset there (`None`: reduced apart,
    /// as a sparse table).
    pub(crate) place: Vec<Option<(usize, usize)>>,
    /// Per bucket: its length.
    pub(crate) lens: Vec<usize>,
    /// Per bucket: how many parameters it holds.
    pub(crate) members: Vec<usize>,
    /// Buffers of the last step, reused.
    spare: Vec<Vec<f32>>,
}

impl GradBuckets {
    pub(crate) fn new(order: &[usize], specs: &[ringtrain_autograd::ParamSpec], bucket_elems: usize) -> GradBuckets {
        let mut place = vec![None; specs.len()];
        let (mut lens, mut members) = (Vec::new(), Vec::new());
        for &p in order {
            let len = specs[p].len;
            match lens.last_mut() {
                Some(open) if *open + len <= bucket_elems || *open == 0 => {}
                _ => {
                    lens.push(0);
                    members.push(0);
                }
            }
            let b = lens.len() - 1;
            place[p] = Some((b, lens[b]));
            lens[b] += len;
            members[b] += 1;
        }
        GradBuckets {
            place,
            lens,
            members,
            spare: Vec::new(),
        }
    }

    /// Copies the averaged buckets back into the flat gradient and keeps their buffers.
    pub(crate) fn scatter(
        &mut self,
        buckets: Vec<Vec<f32>>,
        specs: &[ringtrain_autograd::ParamSpec],
        flat: &mut [f32],
    ) -> Result<(), SyncError> {
        let got: Vec<usize> = buckets.iter().map(Vec::len).collect();
        if got != self.lens {
            return Err(SyncError(format!(
                "the gradient sync returned buckets of {got:?} elements, the plan has {:?}",
                self.lens
            )));
        }
        for (spec, place) in specs.iter().zip(&self.place) {
            if let Some((b, at)) = *place {
                flat[spec.offset..spec.offset + spec.len].copy_from_slice(&buckets[b][at..at + spec.len]);
            }
        }
        self.spare = buckets;
        Ok(())
    }
}

/// Averages an embedding table's gradient over the ranks into its place in `flat`. Every
/// rank first learns how many distinct rows each touched; when the rows and their indices
/// are fewer bytes than the dense ring all-reduce (`rows × (width + 1) < 2 × table`, the same
/// decision on every rank) or `always` is asked, they are all-gathered and summed in rank
/// order (the same bits on every rank) and divided by the world size; otherwise the table,
/// zero outside those rows, is all-reduced. Rows no rank touched get a zero gradient either
/// way, so the optimizer's dense pass keeps its exact semantics.
pub(crate) fn reduce_table(
    sync: &mut dyn GradSync,
    grad: ParamGrad<'_>,
    spec: &ringtrain_autograd::ParamSpec,
    flat: &mut [f32],
    mode: SparseEmbeddings,
) -> Result<(), SyncError> {
    let dst = &mut flat[spec.offset..spec.offset + spec.len];
    let (rows, values) = match grad {
        ParamGrad::Rows(r) => r.coalesce(),
        ParamGrad::Zero => (Vec::new(), Vec::new()),
        // Used some other way too (every rank alike): the dense all-reduce.
        ParamGrad::Dense(d) => {
            dst.copy_from_slice(d.as_slice());
            return sync.all_reduce_mean(dst);
        }
    };
    let (rank, world) = (sync.rank(), sync.world().max(1));
    let width = spec.shape.get(1).copied().unwrap_or(1).max(1);
    let mut counts = vec![0.0f64; world];
    counts[rank] = rows.len() as f64;
    sync.all_reduce_sum_f64(&mut counts)?;
    let total: f64 = counts.iter().sum();
    let sparse = match mode {
        SparseEmbeddings::Always => true,
        SparseEmbeddings::Never => false,
        SparseEmbeddings::Auto => total * ((width + 1) as f64) < 2.0 * spec.len as f64,
    };
    dst.fill(0.0);
    if !sparse {
        for (k, &row) in rows.iter().enumerate() {
            dst[row * width..(row + 1) * width].copy_from_slice(&values[k * width..(k + 1) * width]);
        }
        return sync.all_reduce_mean(dst);
    }
    // Row indices travel as the bits of an f32: exact, and forwarded as bytes.
    let mut payload: Vec<f32> = rows.iter().map(|&r| f32::from_bits(r as u32)).collect();
    payload.extend_from_slice(&values);
    let lens: Vec<usize> = counts.iter().map(|&c| c as usize * (width + 1)).collect();
    // The table's name and shape, FNV-1a: what the frames' layout fingerprint checks.
    let layout = spec
        .name
        .bytes()
        .chain(spec.shape.iter().flat_map(|d| (*d as u64).to_le_bytes()))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let all = sync.all_gather_f32(&payload, &lens, layout)?;
    let table_rows = spec.len / width;
    for (r, buf) in all.iter().enumerate() {
        let n = buf.len() / (width + 1);
        let (ids, vals) = buf.split_at(n);
        for (k, id) in ids.iter().enumerate() {
            let row = id.to_bits() as usize;
            if row >= table_rows {
                return Err(SyncError(format!(
                    "rank {r} sent a gradient for row {row} of {}, which has {table_rows} rows",
                    spec.name
                )));
            }
            for (d, v) in dst[row * width..(row + 1) * width]
                .iter_mut()
                .zip(&vals[k * width..(k + 1) * width])
            {
                *d += v;
            }
        }
    }
    let n = world as f32;
    for d in dst.iter_mut() {
        *d /= n;
    }
    Ok(())
}

/// Fills the buckets of one step from the gradients backward hands over, and sends each
/// bucket on as soon as it and every bucket before it are complete.
pub(crate) struct BucketFiller<'a> {
    plan: &'a GradBuckets,
    specs: &'a [ringtrain_autograd::ParamSpec],
    /// Gradient accumulation: the earlier micro-batches' weighted sum and this one's share.
    earlier: Option<(&'a [f32], f32)>,
    buffers: Vec<Option<Vec<f32>>>,
    missing: Vec<usize>,
    next: usize,
}

impl<'a> BucketFiller<'a> {
    pub(crate) fn new(
        plan: &'a mut GradBuckets,
        specs: &'a [ringtrain_autograd::ParamSpec],
        earlier: Option<(&'a [f32], f32)>,
    ) -> BucketFiller<'a> {
        let mut spare = std::mem::take(&mut plan.spare);
        spare.reverse();
        let buffers = plan
            .lens
            .iter()
            .map(|&len| {
                // Every element is written before the bucket leaves, so old values can stay.
                let mut b = spare.pop().unwrap_or_default();
                b.resize(len, 0.0);
                Some(b)
            })
            .collect();
        BucketFiller {
            missing: plan.members.clone(),
            plan,
            specs,
            earlier,
            buffers,
            next: 0,
        }
    }

    pub(crate) fn put(&mut self, p: usize, grad: ParamGrad<'_>, emit: &mut dyn FnMut(Vec<f32>)) {
        let Some((b, at)) = self.plan.place[p] else {
            return;
        };
        let spec = &self.specs[p];
        let Some(dst) = self.buffers[b].as_mut().map(|buf| &mut buf[at..at + spec.len]) else {
            return;
        };
        // This parameter's share of the earlier micro-batches' sum, if accumulating.
        let earlier = self
            .earlier
            .map(|(acc, share)| (&acc[spec.offset..spec.offset + spec.len], share));
        // The same arithmetic as `Graph::param_grads_into` and `Graph::add_param_grads`, so
        // the bits do not depend on the path.
        match (grad, earlier) {
            (grad, None) => grad.write_into(dst),
            (ParamGrad::Dense(g), Some((acc, share))) => {
                for ((d, a), s) in dst.iter_mut().zip(acc).zip(g.as_slice()) {
                    *d = a + share * s;
                }
            }
            (ParamGrad::Rows(r), Some((acc, share))) => {
                dst.copy_from_slice(acc);
                r.add_into(dst, share);
            }
            (ParamGrad::Zero, Some((acc, _))) => dst.copy_from_slice(acc),
        }
        self.missing[b] -= 1;
        while self.next < self.buffers.len() && self.missing[self.next] == 0 {
            if let Some(done) = self.buffers[self.next].take() {
                emit(done);
            }
            self.next += 1;
        }
    }
}
