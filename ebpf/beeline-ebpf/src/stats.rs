//! Every packet ends in exactly one verdict, counted per program.
use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use beeline_common::{Program, Verdict, VerdictKind, stats_slot};

use crate::maps::BEELINE_STATS;

/// What a program's `try_` function returns: `Ok` when it handed the packet
/// on itself (a redirect), `Err` with the verdict when it stopped early (the
/// packet passes to the host stack or is dropped), so `?` ends the program.
pub type Outcome = Result<Verdict, Verdict>;

/// Counts the verdict and turns it into the tc action.
#[inline(always)]
pub fn finish(ctx: &TcContext, program: Program, outcome: Outcome) -> i32 {
    let verdict = match outcome {
        Ok(v) | Err(v) => v,
    };
    count(program, verdict, ctx.len());
    match verdict.kind() {
        VerdictKind::Redirect => TC_ACT_REDIRECT as i32,
        // TCX_NEXT: the next tc program or classic filter (e.g. the bandwidth
        // plugin's ifb redirect) still sees it, then the host stack.
        VerdictKind::Pass => TC_ACT_UNSPEC,
        VerdictKind::Drop => TC_ACT_SHOT as i32,
    }
}

/// The outcome of a redirect helper: `TC_ACT_SHOT` is its failure.
#[inline(always)]
pub fn redirected(helper_result: i64, verdict: Verdict) -> Outcome {
    if helper_result as i32 == TC_ACT_SHOT as i32 {
        return Err(Verdict::DroppedHelperError);
    }
    Ok(verdict)
}

/// One packet (or socket call) of `bytes` under (program, verdict).
#[inline(always)]
pub fn count(program: Program, verdict: Verdict, bytes: u32) {
    if let Some(counter) = BEELINE_STATS.get_ptr_mut(stats_slot(program, verdict)) {
        // SAFETY: a per-CPU slot, valid for the program's lifetime; nothing
        // else runs on this CPU while we do.
        let counter = unsafe { &mut *counter };
        counter.packets += 1;
        counter.bytes += bytes as u64;
    }
}
