//! Linearizability checking for per-key register histories.
//!
//! A [`History`] records every client operation issued against the store: what
//! was asked ([`Op`]), when it was invoked, when it completed and what came back
//! ([`Outcome`]). [`History::check`] decides whether that behaviour is
//! linearizable with respect to a model of one key: a register holding a value
//! and the revision at which it was last written, with compare-and-swap on that
//! revision and delete.
//!
//! The model is partitionable by key, so linearizability is checked per key (a
//! history is linearizable iff every key's sub-history is).
//!
//! # Model
//!
//! The state of a key is absent, or a value with its mod revision, which is
//! unknown when the value was written by an operation whose reply was lost.
//! Values written are unique across the history, and revisions grow with every
//! write, so the state also keeps a *floor*: the highest revision linearized
//! so far. A definite write must be above it, also after a delete or a write
//! of unknown revision, a read that tells an unknown revision must be above
//! it, and a compare-and-swap succeeds on an unknown revision only if it
//! expected a revision above it (otherwise an unknown revision lets a
//! compare-and-swap go either way).
//!
//! # Algorithm
//!
//! Each key is checked with the Wing–Gong search as refined by Lowe ("WGL"):
//! the call and return entries of all operations form a time-ordered doubly
//! linked list (calls before returns at equal times: such operations are
//! concurrent); the search walks it from the head, lifts out an operation
//! whose call it meets when the model accepts the operation in the current
//! state, restarts from the head, and backtracks when it meets the return of
//! an operation that has not been linearized yet. Configurations already seen
//! (the set of linearized operations plus the model state) are memoised.
//!
//! Operations with an [`Outcome::Unknown`] outcome may have taken effect at any
//! time after their invocation, or never: their return is placed at +infinity
//! (after all others) and they do not have to be linearized; a search that has
//! linearized every other operation succeeds. An unknown `Get` is dropped, an
//! unknown `Cas` is only taken in its successful branch. Each unknown
//! operation could be taken at any of the later steps, which would multiply
//! the search; these exact reductions keep it close to the cost of a history
//! without them:
//!
//! * An unknown write whose (unique) value was read did take effect, before
//!   that read returned: it is a definite operation completing when the first
//!   such read completed.
//! * Values no read returned are indistinguishable and are all mapped to one
//!   "ghost" value; unknown operations equal after that are interchangeable,
//!   and of those only the earliest invoked one still pending is ever taken.
//! * An unknown operation is only taken right before a definite operation (or
//!   another unknown one) it enables; see `may_follow` for why that loses no
//!   linearization. Only configurations reached by a definite operation are
//!   memoised.
//! * Configurations are compared by *dominance*: one with the same definite
//!   operations linearized and the same state, but more unknown operations
//!   still pending, can do all the other one can, so the other is pruned. The
//!   search tries definite operations before unknown ones, so that dominating
//!   configurations tend to be met first.
//!
//! The search gives up after a bound on the explored states
//! ([`DEFAULT_MAX_STATES`], or [`History::check_with_limit`]).
//!
//! When a key fails, its history is shrunk: the shortest failing prefix of
//! invocations (binary search), then the removal, in chunks of halving size
//! and finally one by one, of the operations without effect on the state
//! (`Get`, refused `Cas`, `Delete` of an absent key) it does not need. The
//! result is reported as a [`Violation`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Bound on the configurations explored for one key by [`History::check`]
/// before the search gives up.
pub const DEFAULT_MAX_STATES: usize = 5_000_000;

/// Reason given in a [`Violation`] for a history that is not linearizable.
pub const NOT_LINEARIZABLE: &str = "not linearizable";

/// An operation on one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Unconditionally write `value`.
    Put {
        /// The value written; unique across the whole history.
        value: String,
    },
    /// Read the key's value and mod revision.
    Get,
    /// Write `value` only if the key's mod revision is `expect_revision`.
    Cas {
        /// The expected mod revision; 0 means "only if the key is absent".
        expect_revision: u64,
        /// The value written on success; unique across the whole history.
        value: String,
    },
    /// Remove the key.
    Delete,
}

/// What a completed operation returned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    /// A `Put` or a successful `Cas` was committed at `revision`.
    Written {
        /// The revision of the write (the key's new mod revision).
        revision: u64,
    },
    /// The result of a `Get`: the value and its mod revision, or `None` when
    /// the key is absent.
    Read(Option<(String, u64)>),
    /// A `Cas` was refused because the key's revision did not match.
    CasFailed,
    /// A `Delete` completed.
    Deleted {
        /// Whether the key was present before the delete.
        existed: bool,
    },
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The operation returned this result.
    Ok(Ret),
    /// No reply (timeout, lost connection): the operation may have taken
    /// effect at any time after its invocation, or never.
    Unknown,
}

/// One operation of one client, with its real-time interval.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    /// The client that issued the operation.
    pub client: u64,
    /// The key operated on.
    pub key: String,
    /// What was asked.
    pub op: Op,
    /// Invocation time, in nanoseconds since the start of the run (monotonic).
    pub invoke: u64,
    /// What came back.
    pub outcome: Outcome,
    /// Completion time in nanoseconds; ignored when the outcome is unknown.
    pub complete: u64,
}

/// A record of operations, possibly on many keys and from many clients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    events: Vec<Event>,
}

/// A key whose history could not be shown linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// [`NOT_LINEARIZABLE`], or "search gave up after N states" when the
    /// search exceeded its bound without an answer.
    pub reason: String,
    /// Whether the search gave up (the history may still be linearizable).
    pub gave_up: bool,
    /// The failing events of that key, sorted by invocation: a minimal failing
    /// sub-history when the history is not linearizable, the whole history of
    /// the key when the search gave up.
    pub history: Vec<Event>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one operation.
    pub fn push(&mut self, event: Event) {
        self.events.push(event);
    }

    /// The number of recorded operations.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The recorded operations, in recording order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Checks every key separately, exploring at most [`DEFAULT_MAX_STATES`]
    /// configurations per key; returns the violation of the first failing key
    /// (in key order).
    pub fn check(&self) -> Result<(), Violation> {
        self.check_with_limit(DEFAULT_MAX_STATES)
    }

    /// Like [`History::check`], exploring at most `max_states` configurations
    /// per key (and per check while shrinking a failing history).
    pub fn check_with_limit(&self, max_states: usize) -> Result<(), Violation> {
        let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for event in &self.events {
            by_key.entry(event.key.as_str()).or_default().push(event);
        }
        for (key, mut events) in by_key {
            // Stable: events invoked at the same time keep their recording order.
            events.sort_by_key(|e| e.invoke);
            match check_key(&events, max_states) {
                (Verdict::Linearizable, _) => {}
                (Verdict::GaveUp(states), _) => {
                    return Err(Violation {
                        key: key.to_owned(),
                        reason: format!("search gave up after {states} states"),
                        gave_up: true,
                        history: events.into_iter().cloned().collect(),
                    });
                }
                (Verdict::Violated, states) => {
                    let budget = states
                        .saturating_mul(SHRINK_BUDGET_FACTOR)
                        .saturating_add(SHRINK_BUDGET_MIN);
                    return Err(Violation {
                        key: key.to_owned(),
                        reason: NOT_LINEARIZABLE.to_owned(),
                        gave_up: false,
                        history: minimise(&events, max_states, budget),
                    });
                }
            }
        }
        Ok(())
    }
}

impl From<Vec<Event>> for History {
    fn from(events: Vec<Event>) -> Self {
        Self { events }
    }
}

impl Extend<Event> for History {
    fn extend<I: IntoIterator<Item = Event>>(&mut self, iter: I) {
        self.events.extend(iter);
    }
}

impl std::error::Error for Violation {}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key {:?}: {} ({} events)",
            self.key,
            self.reason,
            self.history.len()
        )?;
        let mut events: Vec<&Event> = self.history.iter().collect();
        events.sort_by_key(|e| e.invoke);
        for e in events {
            let complete = match e.outcome {
                Outcome::Unknown => "?".to_owned(),
                Outcome::Ok(_) => millis(e.complete),
            };
            write!(
                f,
                "\n  client {:<4} {:<36} {:>12} .. {:>12} ms  -> {}",
                e.client,
                e.op.to_string(),
                millis(e.invoke),
                complete,
                e.outcome
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Put { value } => write!(f, "put {value:?}"),
            Op::Get => f.write_str("get"),
            Op::Cas {
                expect_revision,
                value,
            } => write!(f, "cas {value:?} if rev={expect_revision}"),
            Op::Delete => f.write_str("delete"),
        }
    }
}

impl fmt::Display for Ret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ret::Written { revision } => write!(f, "written rev={revision}"),
            Ret::Read(Some((value, revision))) => write!(f, "read {value:?} rev={revision}"),
            Ret::Read(None) => f.write_str("read absent"),
            Ret::CasFailed => f.write_str("cas failed"),
            Ret::Deleted { existed } => write!(f, "deleted existed={existed}"),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok(ret) => ret.fmt(f),
            Outcome::Unknown => f.write_str("unknown"),
        }
    }
}

/// Nanoseconds as milliseconds with three decimals.
fn millis(ns: u64) -> String {
    format!("{}.{:03}", ns / 1_000_000, (ns / 1_000) % 1_000)
}

// ---------------------------------------------------------------------------
// The model of one key.

/// A value, interned per key.
type Val = u32;

/// Stands for every value that no completed `Get` returned: such values are
/// indistinguishable to the model.
const GHOST: Val = Val::MAX;

/// The state of one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct State {
    /// Absent, or a value with its mod revision (`None` when the value was
    /// written by an operation whose reply was lost and no read told it).
    current: Option<(Val, Option<u64>)>,
    /// The highest revision known to be linearized so far: revisions grow
    /// with every write, so any later write has a larger one, also after a
    /// delete or a write of unknown revision.
    floor: u64,
}

impl State {
    /// The state after a write of `value` at `revision`.
    fn written(self, value: Val, revision: Option<u64>) -> Self {
        Self {
            current: Some((value, revision)),
            floor: revision.map_or(self.floor, |r| r.max(self.floor)),
        }
    }
}

/// An operation together with its result, as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    /// A write; `revision` is `None` when its reply was lost.
    Put { value: Val, revision: Option<u64> },
    /// A read that returned `read`.
    Get { read: Option<(Val, u64)> },
    /// A compare-and-swap that succeeded (or, with `revision: None`, one whose
    /// reply was lost, taken in its successful branch).
    CasOk {
        expect: u64,
        value: Val,
        revision: Option<u64>,
    },
    /// A compare-and-swap that was refused.
    CasFailed { expect: u64 },
    /// A delete; `existed` is `None` when its reply was lost.
    Delete { existed: Option<bool> },
    /// A result that does not fit the operation: never legal.
    Invalid,
}

/// Whether a compare-and-swap expecting `expect` may succeed in `state`.
fn cas_may_match(state: State, expect: u64) -> bool {
    match state.current {
        None => expect == 0,
        Some((_, Some(revision))) => revision == expect,
        // An unknown revision is above the floor (and so not 0).
        Some((_, None)) => expect > state.floor,
    }
}

/// Whether a compare-and-swap expecting `expect` may be refused in `state`.
fn cas_may_differ(state: State, expect: u64) -> bool {
    match state.current {
        None => expect != 0,
        Some((_, Some(revision))) => revision != expect,
        Some((_, None)) => true,
    }
}

/// Applies `kind` to `state`: the next state, or `None` when the operation
/// cannot have returned what it did in that state.
fn step(state: State, kind: Kind) -> Option<State> {
    match kind {
        Kind::Put { value, revision } => revision
            .is_none_or(|r| r > state.floor)
            .then(|| state.written(value, revision)),
        Kind::Get { read: None } => state.current.is_none().then_some(state),
        Kind::Get {
            read: Some((value, revision)),
        } => match state.current {
            Some((current, Some(known))) if current == value && known == revision => Some(state),
            // The read tells the revision of a write whose reply was lost.
            Some((current, None)) if current == value && revision > state.floor => {
                Some(state.written(value, Some(revision)))
            }
            _ => None,
        },
        Kind::CasOk {
            expect,
            value,
            revision,
        } => {
            let legal = cas_may_match(state, expect)
                && revision.is_none_or(|r| r > state.floor && r > expect);
            // On success the previous revision was `expect`.
            let floor = state.floor.max(expect);
            legal.then(|| State { floor, ..state }.written(value, revision))
        }
        Kind::CasFailed { expect } => cas_may_differ(state, expect).then_some(state),
        Kind::Delete { existed } => match existed {
            Some(existed) if existed != state.current.is_some() => None,
            _ => Some(State {
                current: None,
                ..state
            }),
        },
        Kind::Invalid => None,
    }
}

/// One operation of a key's history, ready for the search.
#[derive(Clone, Copy, Debug)]
struct KeyOp {
    kind: Kind,
    /// Must be linearized (it completed, or its effect was observed).
    definite: bool,
    call: u64,
    /// Return time; `None` is +infinity (unknown operations).
    ret: Option<u64>,
    /// Index among the definite, or among the unknown, operations.
    slot: usize,
    /// Unknown operations: the class of unknown operations with the same
    /// `kind` (interchangeable ones), and the index in that class.
    class: usize,
    rank: usize,
}

/// The history of one key in model terms.
#[derive(Debug)]
struct KeyModel {
    /// Sorted by invocation.
    ops: Vec<KeyOp>,
    definite: usize,
    unknown: usize,
    /// The number of classes of interchangeable unknown operations.
    classes: usize,
}

fn intern<'a>(values: &mut HashMap<&'a str, Val>, value: &'a str) -> Val {
    let next = Val::try_from(values.len()).unwrap_or(GHOST - 1);
    *values.entry(value).or_insert(next)
}

impl KeyModel {
    /// Builds the model of one key's events, which must be sorted by
    /// invocation. With `optimise`, unknown writes whose value was read become
    /// definite operations returning when the first such read returned, and
    /// the values nobody read become [`GHOST`].
    fn build(events: &[&Event], optimise: bool) -> Self {
        let mut values: HashMap<&str, Val> = HashMap::new();
        let mut ops = Vec::with_capacity(events.len());
        for e in events {
            let (kind, definite) = match (&e.op, &e.outcome) {
                (Op::Get, Outcome::Unknown) => continue,
                (Op::Get, Outcome::Ok(Ret::Read(read))) => {
                    let read = read
                        .as_ref()
                        .map(|(value, revision)| (intern(&mut values, value), *revision));
                    (Kind::Get { read }, true)
                }
                (Op::Put { value }, Outcome::Ok(Ret::Written { revision })) => {
                    let value = intern(&mut values, value);
                    let revision = Some(*revision);
                    (Kind::Put { value, revision }, true)
                }
                (Op::Put { value }, Outcome::Unknown) => {
                    let value = intern(&mut values, value);
                    (
                        Kind::Put {
                            value,
                            revision: None,
                        },
                        false,
                    )
                }
                (
                    Op::Cas {
                        expect_revision,
                        value,
                    },
                    outcome,
                ) => {
                    let expect = *expect_revision;
                    match outcome {
                        Outcome::Ok(Ret::CasFailed) => (Kind::CasFailed { expect }, true),
                        Outcome::Ok(Ret::Written { revision }) => {
                            let value = intern(&mut values, value);
                            let revision = Some(*revision);
                            let kind = Kind::CasOk {
                                expect,
                                value,
                                revision,
                            };
                            (kind, true)
                        }
                        Outcome::Unknown => {
                            let value = intern(&mut values, value);
                            let kind = Kind::CasOk {
                                expect,
                                value,
                                revision: None,
                            };
                            (kind, false)
                        }
                        Outcome::Ok(_) => (Kind::Invalid, true),
                    }
                }
                (Op::Delete, Outcome::Ok(Ret::Deleted { existed })) => (
                    Kind::Delete {
                        existed: Some(*existed),
                    },
                    true,
                ),
                (Op::Delete, Outcome::Unknown) => (Kind::Delete { existed: None }, false),
                (_, Outcome::Ok(_)) => (Kind::Invalid, true),
            };
            let ret = definite.then_some(e.complete.max(e.invoke));
            ops.push(KeyOp {
                kind,
                definite,
                call: e.invoke,
                ret,
                slot: 0,
                class: 0,
                rank: 0,
            });
        }

        if optimise {
            let mut first_read: HashMap<Val, u64> = HashMap::new();
            for op in &ops {
                if let (
                    Kind::Get {
                        read: Some((value, _)),
                    },
                    Some(ret),
                ) = (op.kind, op.ret)
                {
                    let earliest = first_read.entry(value).or_insert(ret);
                    *earliest = (*earliest).min(ret);
                }
            }
            for op in ops.iter_mut().filter(|op| !op.definite) {
                if let Kind::Put { value, .. } | Kind::CasOk { value, .. } = op.kind
                    && let Some(&ret) = first_read.get(&value)
                {
                    op.definite = true;
                    op.ret = Some(ret);
                }
            }
            for op in &mut ops {
                if let Kind::Put { value, .. } | Kind::CasOk { value, .. } = &mut op.kind
                    && !first_read.contains_key(value)
                {
                    *value = GHOST;
                }
            }
        }

        let (mut definite, mut unknown) = (0, 0);
        let mut classes: HashMap<Kind, usize> = HashMap::new();
        let mut class_sizes: Vec<usize> = Vec::new();
        for op in &mut ops {
            if op.definite {
                op.slot = definite;
                definite += 1;
            } else {
                op.slot = unknown;
                unknown += 1;
                let next_class = classes.len();
                op.class = *classes.entry(op.kind).or_insert(next_class);
                if op.class == class_sizes.len() {
                    class_sizes.push(0);
                }
                op.rank = class_sizes[op.class];
                class_sizes[op.class] += 1;
            }
        }
        Self {
            ops,
            definite,
            unknown,
            classes: class_sizes.len(),
        }
    }
}

// ---------------------------------------------------------------------------
// The search.

/// The answer for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Linearizable,
    Violated,
    /// The search explored this many configurations without an answer.
    GaveUp(usize),
}

/// Checks one key's events (sorted by invocation); also returns the number of
/// configurations explored.
fn check_key(events: &[&Event], max_states: usize) -> (Verdict, usize) {
    search(&KeyModel::build(events, true), max_states)
}

/// The number of 64-bit words of a set of `bits` bits.
fn words(bits: usize) -> usize {
    bits.div_ceil(64)
}

fn flip(set: &mut [u64], bit: usize) {
    set[bit / 64] ^= 1 << (bit % 64);
}

fn is_subset(small: &[u64], large: &[u64]) -> bool {
    small.iter().zip(large).all(|(s, l)| s & !l == 0)
}

/// A set of linearized definite operations, compacted (the index of its first
/// word that is not full, and the words from there to its last non-empty
/// one), with a state.
type MemoKey = (u32, Box<[u64]>, State);

/// The memo of configurations seen: for each set of linearized definite
/// operations and state, the antichain of sets of linearized unknown
/// operations (flattened, `stride` words each).
struct Memo {
    stride: usize,
    seen: HashMap<MemoKey, Vec<u64>>,
}

impl Memo {
    fn new(unknown: usize) -> Self {
        Self {
            stride: words(unknown).max(1),
            seen: HashMap::new(),
        }
    }

    /// Records a configuration; `false` when a configuration seen before
    /// dominates it (same definite operations and state, and a subset of its
    /// unknown operations linearized).
    fn visit(&mut self, definite: &[u64], state: State, unknown: &[u64]) -> bool {
        // Compact key: the linearized definite operations are mostly a prefix.
        let start = definite
            .iter()
            .position(|&w| w != u64::MAX)
            .unwrap_or(definite.len());
        let end = definite
            .iter()
            .rposition(|&w| w != 0)
            .map_or(start, |last| (last + 1).max(start));
        let first = u32::try_from(start).unwrap_or(u32::MAX);
        let key = (first, Box::<[u64]>::from(&definite[start..end]), state);
        let stride = self.stride;
        let list = self.seen.entry(key).or_default();
        if list
            .chunks_exact(stride)
            .any(|seen| is_subset(seen, unknown))
        {
            return false;
        }
        // Drop the configurations the new one dominates.
        let mut kept = 0;
        for i in 0..list.len() / stride {
            if !is_subset(unknown, &list[i * stride..(i + 1) * stride]) {
                list.copy_within(i * stride..(i + 1) * stride, kept * stride);
                kept += 1;
            }
        }
        list.truncate(kept * stride);
        list.extend_from_slice(unknown);
        true
    }
}

/// Whether `op`, reaching `new_state`, may be lifted next.
///
/// Unknown operations are only lifted to enable what follows: right after an
/// unknown operation lifted in state `before`, a definite operation is only
/// lifted if it was not legal in `before`, and another unknown one only if
/// lifting it in `before` would not reach the same state. Any linearization
/// can be put in that form: when the operation that follows an unknown one
/// was legal without it, the unknown one can be dropped (the state reached is
/// the same, or has a lower revision floor, which allows more) or, for a
/// refused compare-and-swap, moved after it. The unknown operation and the
/// operations up to the next definite one form one step of the search, so
/// only configurations reached by a definite operation are memoised.
fn may_follow(ops: &[KeyOp], stack: &[(usize, State)], op: KeyOp, new_state: State) -> bool {
    match stack.last() {
        Some(&(top, before)) if !ops[top].definite => {
            if op.definite {
                step(before, op.kind).is_none()
            } else {
                step(before, op.kind) != Some(new_state)
            }
        }
        _ => true,
    }
}

/// "No entry" in the linked list.
const NIL: usize = usize::MAX;
/// The list's head sentinel.
const HEAD: usize = 0;

/// The WGL search over one key's operations.
fn search(model: &KeyModel, max_states: usize) -> (Verdict, usize) {
    let ops = &model.ops;
    if model.definite == 0 {
        return (Verdict::Linearizable, 0);
    }

    // Entries sorted by time; at equal times calls come first (the operations
    // are taken as concurrent); unknown returns come last.
    let mut order: Vec<(bool, u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
    for (i, op) in ops.iter().enumerate() {
        order.push((false, op.call, false, i));
        order.push((op.ret.is_none(), op.ret.unwrap_or(0), true, i));
    }
    order.sort_unstable();
    let entries = order.len() + 1;
    let mut next = vec![NIL; entries];
    let mut prev = vec![NIL; entries];
    let mut entry_op = vec![0; entries];
    let mut entry_is_call = vec![false; entries];
    let mut call_entry = vec![0; ops.len()];
    let mut ret_entry = vec![0; ops.len()];
    for (pos, &(_, _, is_return, op)) in order.iter().enumerate() {
        let e = pos + 1;
        entry_op[e] = op;
        entry_is_call[e] = !is_return;
        if is_return {
            ret_entry[op] = e;
        } else {
            call_entry[op] = e;
        }
        prev[e] = e - 1;
        next[e - 1] = e;
    }

    let unlink = |next: &mut [usize], prev: &mut [usize], e: usize| {
        next[prev[e]] = next[e];
        if next[e] != NIL {
            prev[next[e]] = prev[e];
        }
    };
    let relink = |next: &mut [usize], prev: &mut [usize], e: usize| {
        if next[e] != NIL {
            prev[next[e]] = e;
        }
        next[prev[e]] = e;
    };

    let mut definite_set = vec![0u64; words(model.definite)];
    let mut unknown_set = vec![0u64; words(model.unknown).max(1)];
    let mut definite_done = 0;
    let mut unknown_pending = model.unknown;
    // Unknown operations of one class are interchangeable: only the earliest
    // pending one of a class is ever lifted, so the lifted ones of each class
    // are its first `class_lifted[class]`.
    let mut class_lifted = vec![0usize; model.classes];
    let mut memo = Memo::new(model.unknown);
    let mut state = State::default();
    memo.visit(&definite_set, state, &unknown_set);
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut explored = 0;
    // Each step first tries the definite operations, then the unknown ones.
    let mut unknown_pass = false;
    let mut cur = next[HEAD];

    loop {
        if cur != NIL && entry_is_call[cur] {
            let o = entry_op[cur];
            let op = ops[o];
            if op.definite != unknown_pass
                && (op.definite || class_lifted[op.class] == op.rank)
                && let Some(new_state) = step(state, op.kind)
                && may_follow(ops, &stack, op, new_state)
            {
                let set = if op.definite {
                    &mut definite_set
                } else {
                    &mut unknown_set
                };
                flip(set, op.slot);
                if !op.definite || memo.visit(&definite_set, new_state, &unknown_set) {
                    explored += 1;
                    if explored > max_states {
                        return (Verdict::GaveUp(explored), explored);
                    }
                    stack.push((o, state));
                    state = new_state;
                    unlink(&mut next, &mut prev, call_entry[o]);
                    unlink(&mut next, &mut prev, ret_entry[o]);
                    if op.definite {
                        definite_done += 1;
                        if definite_done == model.definite {
                            return (Verdict::Linearizable, explored);
                        }
                    } else {
                        unknown_pending -= 1;
                        class_lifted[op.class] += 1;
                    }
                    unknown_pass = false;
                    cur = next[HEAD];
                    continue;
                }
                let set = if op.definite {
                    &mut definite_set
                } else {
                    &mut unknown_set
                };
                flip(set, op.slot);
            }
            cur = next[cur];
            continue;
        }

        // The walk met the return of an operation not linearized yet: no
        // other operation can come first.
        if !unknown_pass && unknown_pending > 0 {
            unknown_pass = true;
            cur = next[HEAD];
            continue;
        }
        let Some((o, previous)) = stack.pop() else {
            return (Verdict::Violated, explored);
        };
        let op = ops[o];
        state = previous;
        relink(&mut next, &mut prev, ret_entry[o]);
        relink(&mut next, &mut prev, call_entry[o]);
        if op.definite {
            flip(&mut definite_set, op.slot);
            definite_done -= 1;
        } else {
            flip(&mut unknown_set, op.slot);
            unknown_pending += 1;
            class_lifted[op.class] -= 1;
        }
        unknown_pass = !op.definite;
        cur = next[call_entry[o]];
    }
}

// ---------------------------------------------------------------------------
// Shrinking.

/// Whether an event cannot change the key's state in any legal linearization,
/// so that removing it from a failing history leaves a failing history.
fn without_effect(event: &Event) -> bool {
    matches!(
        (&event.op, &event.outcome),
        (Op::Get, _)
            | (Op::Cas { .. }, Outcome::Ok(Ret::CasFailed))
            | (Op::Delete, Outcome::Ok(Ret::Deleted { existed: false }))
    )
}

/// Shrinking a failing history may explore this many times the states the
/// check that found the violation explored ...
const SHRINK_BUDGET_FACTOR: usize = 20;
/// ... plus this many.
const SHRINK_BUDGET_MIN: usize = 1_000_000;

/// A small failing sub-history of a failing key history (sorted by
/// invocation): the shortest failing prefix of invocations found by binary
/// search, without the effect-free operations it does not need. Stops
/// shrinking, keeping what it has, once the checks explored `budget` states.
fn minimise(events: &[&Event], max_states: usize, mut budget: usize) -> Vec<Event> {
    let mut fails = |events: &[&Event]| {
        if budget == 0 {
            return false;
        }
        let (verdict, states) = check_key(events, max_states.min(budget));
        budget = budget.saturating_sub(states);
        verdict == Verdict::Violated
    };

    // The empty prefix passes and the whole history fails.
    let (mut passes, mut fails_at) = (0, events.len());
    while fails_at - passes > 1 {
        let mid = passes + (fails_at - passes) / 2;
        if fails(&events[..mid]) {
            fails_at = mid;
        } else {
            passes = mid;
        }
    }
    let prefix = &events[..fails_at];

    // Remove effect-free operations, in chunks of halving size down to one.
    let mut keep = vec![true; prefix.len()];
    let candidates = prefix.iter().filter(|e| without_effect(e)).count();
    let mut size = candidates.div_ceil(2).max(1);
    loop {
        let positions: Vec<usize> = (0..prefix.len())
            .filter(|&i| keep[i] && without_effect(prefix[i]))
            .collect();
        for chunk in positions.chunks(size) {
            for &i in chunk {
                keep[i] = false;
            }
            if !fails(&kept(prefix, &keep)) {
                for &i in chunk {
                    keep[i] = true;
                }
            }
        }
        if size == 1 {
            break;
        }
        size = size.div_ceil(2);
    }
    kept(prefix, &keep).into_iter().cloned().collect()
}

/// The events whose `keep` flag is set.
fn kept<'a>(events: &[&'a Event], keep: &[bool]) -> Vec<&'a Event> {
    events
        .iter()
        .zip(keep)
        .filter(|&(_, &k)| k)
        .map(|(&e, _)| e)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Instant;

    const K: &str = "k";

    fn ev(client: u64, invoke: u64, complete: u64, op: Op, outcome: Outcome) -> Event {
        Event {
            client,
            key: K.to_owned(),
            op,
            invoke,
            outcome,
            complete,
        }
    }

    fn put(value: &str) -> Op {
        Op::Put {
            value: value.to_owned(),
        }
    }

    fn cas(expect_revision: u64, value: &str) -> Op {
        Op::Cas {
            expect_revision,
            value: value.to_owned(),
        }
    }

    fn written(revision: u64) -> Outcome {
        Outcome::Ok(Ret::Written { revision })
    }

    fn read(value: &str, revision: u64) -> Outcome {
        Outcome::Ok(Ret::Read(Some((value.to_owned(), revision))))
    }

    fn absent() -> Outcome {
        Outcome::Ok(Ret::Read(None))
    }

    fn cas_failed() -> Outcome {
        Outcome::Ok(Ret::CasFailed)
    }

    fn deleted(existed: bool) -> Outcome {
        Outcome::Ok(Ret::Deleted { existed })
    }

    fn check(events: Vec<Event>) -> Result<(), Violation> {
        History::from(events).check()
    }

    fn assert_violation(events: Vec<Event>) -> Violation {
        let violation = check(events).unwrap_err();
        assert_eq!(violation.reason, NOT_LINEARIZABLE, "{violation}");
        assert!(!violation.gave_up);
        violation
    }

    #[test]
    fn empty_and_sequential_put_get_ok() {
        assert!(History::new().check().is_ok());
        let events = vec![
            ev(1, 0, 10, Op::Get, absent()),
            ev(1, 20, 30, put("a"), written(1)),
            ev(2, 40, 50, Op::Get, read("a", 1)),
            ev(1, 60, 70, put("b"), written(2)),
            ev(2, 80, 90, Op::Get, read("b", 2)),
        ];
        let history = History::from(events);
        assert_eq!(history.len(), 5);
        assert!(!history.is_empty());
        assert!(history.check().is_ok());
    }

    #[test]
    fn stale_read_after_completed_write_is_violation() {
        let violation = assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 30, Op::Get, read("a", 1)),
            ev(1, 40, 50, put("b"), written(2)),
            ev(2, 60, 70, Op::Get, read("a", 1)),
            ev(3, 80, 90, Op::Get, read("b", 2)),
        ]);
        assert_eq!(violation.key, K);
        assert!(violation.history.len() <= 3, "{violation}");
        // The stale read itself is part of the minimal history.
        assert!(
            violation
                .history
                .iter()
                .any(|e| e.invoke == 60 && e.outcome == read("a", 1))
        );
        let text = violation.to_string();
        assert!(text.starts_with("key \"k\": not linearizable"), "{text}");
        assert_eq!(text.lines().count(), 1 + violation.history.len(), "{text}");
    }

    #[test]
    fn concurrent_put_and_get_may_see_old_or_new_value() {
        for outcome in [read("a", 1), read("b", 2)] {
            let events = vec![
                ev(1, 0, 10, put("a"), written(1)),
                ev(1, 20, 60, put("b"), written(2)),
                ev(2, 30, 50, Op::Get, outcome),
            ];
            assert!(check(events).is_ok());
        }
        // But once a read saw the new value, a later read cannot see the old.
        assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(1, 20, 100, put("b"), written(2)),
            ev(2, 30, 40, Op::Get, read("b", 2)),
            ev(3, 50, 60, Op::Get, read("a", 1)),
        ]);
    }

    #[test]
    fn equal_timestamps_are_concurrent() {
        // The get is invoked exactly when the put completes: either order.
        let events = vec![
            ev(1, 0, 10, Op::Get, read("a", 1)),
            ev(2, 10, 20, put("a"), written(1)),
        ];
        assert!(check(events).is_ok());
        let events = vec![
            ev(1, 0, 9, Op::Get, read("a", 1)),
            ev(2, 10, 20, put("a"), written(1)),
        ];
        assert_violation(events);
    }

    #[test]
    fn unknown_put_later_read_is_ok() {
        let events = vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 0, put("b"), Outcome::Unknown),
            ev(3, 30, 40, Op::Get, read("a", 1)),
            ev(3, 1_000, 1_010, Op::Get, read("b", 2)),
            ev(3, 1_020, 1_030, Op::Get, read("b", 2)),
        ];
        assert!(check(events).is_ok());
    }

    #[test]
    fn unknown_put_never_read_is_ok() {
        let events = vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 0, put("b"), Outcome::Unknown),
            ev(3, 30, 40, Op::Get, read("a", 1)),
            ev(3, 50, 60, Op::Get, read("a", 1)),
            ev(4, 70, 0, Op::Get, Outcome::Unknown),
        ];
        assert!(check(events).is_ok());
    }

    #[test]
    fn unknown_put_read_before_its_invocation_is_violation() {
        assert_violation(vec![
            ev(1, 0, 10, Op::Get, read("b", 2)),
            ev(2, 20, 0, put("b"), Outcome::Unknown),
        ]);
        // Read, then overwritten, then read again: the value cannot come back.
        assert_violation(vec![
            ev(2, 0, 0, put("b"), Outcome::Unknown),
            ev(1, 10, 20, Op::Get, read("b", 2)),
            ev(1, 30, 40, put("c"), written(3)),
            ev(1, 50, 60, Op::Get, read("b", 2)),
        ]);
    }

    #[test]
    fn unknown_delete_may_explain_absence() {
        let events = vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 0, Op::Delete, Outcome::Unknown),
            ev(3, 30, 40, Op::Get, read("a", 1)),
            ev(3, 50, 60, Op::Get, absent()),
        ];
        assert!(check(events).is_ok());
        let events = vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(3, 30, 40, Op::Get, absent()),
            ev(2, 50, 0, Op::Delete, Outcome::Unknown),
        ];
        assert_violation(events);
    }

    #[test]
    fn read_of_value_never_written_is_violation() {
        let violation = assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 5, 15, Op::Get, read("zz", 1)),
        ]);
        // The put stays: only operations without effect are removed.
        assert_eq!(violation.history.len(), 2, "{violation}");
        assert_violation(vec![ev(1, 0, 10, Op::Get, read("a", 1))]);
    }

    #[test]
    fn read_with_wrong_revision_is_violation() {
        assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 30, Op::Get, read("a", 7)),
        ]);
    }

    #[test]
    fn revisions_must_increase() {
        assert_violation(vec![
            ev(1, 0, 10, put("a"), written(5)),
            ev(1, 20, 30, put("b"), written(3)),
        ]);
        // Concurrent writes are ordered by their revisions.
        let events = vec![
            ev(1, 0, 30, put("a"), written(5)),
            ev(2, 10, 20, put("b"), written(3)),
            ev(3, 40, 50, Op::Get, read("a", 5)),
        ];
        assert!(check(events).is_ok());
        assert_violation(vec![
            ev(1, 0, 30, put("a"), written(5)),
            ev(2, 10, 20, put("b"), written(3)),
            ev(3, 40, 50, Op::Get, read("b", 3)),
        ]);
    }

    #[test]
    fn cas_with_right_revision_succeeds() {
        let events = vec![
            ev(1, 0, 10, cas(0, "a"), written(1)),
            ev(1, 20, 30, cas(1, "b"), written(2)),
            ev(2, 40, 50, cas(1, "c"), cas_failed()),
            ev(2, 60, 70, cas(0, "d"), cas_failed()),
            ev(2, 80, 90, Op::Get, read("b", 2)),
        ];
        assert!(check(events).is_ok());
        // Expecting absence on a present key cannot succeed.
        assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 30, cas(0, "b"), written(2)),
        ]);
        // A stale expectation cannot succeed.
        assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(1, 20, 30, put("b"), written(2)),
            ev(2, 40, 50, cas(1, "c"), written(3)),
        ]);
    }

    #[test]
    fn two_concurrent_cas_on_same_revision_cannot_both_succeed() {
        let ok = vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 50, cas(1, "b"), written(2)),
            ev(3, 25, 55, cas(1, "c"), cas_failed()),
        ];
        assert!(check(ok).is_ok());
        let violation = assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 50, cas(1, "b"), written(2)),
            ev(3, 25, 55, cas(1, "c"), written(3)),
        ]);
        assert_eq!(violation.history.len(), 3, "{violation}");
    }

    #[test]
    fn cas_failed_when_revision_matched_is_violation() {
        assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 30, cas(1, "b"), cas_failed()),
        ]);
        assert_violation(vec![ev(2, 20, 30, cas(0, "b"), cas_failed())]);
        // A concurrent write can explain the failure.
        let events = vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 30, cas(1, "b"), cas_failed()),
            ev(3, 15, 25, put("c"), written(2)),
        ];
        assert!(check(events).is_ok());
    }

    #[test]
    fn unknown_cas_is_taken_only_when_it_can_succeed() {
        // Its value was read, so it succeeded: but it expected a stale revision.
        assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(1, 20, 30, put("b"), written(2)),
            ev(2, 40, 0, cas(1, "c"), Outcome::Unknown),
            ev(3, 50, 60, Op::Get, read("c", 3)),
        ]);
        let events = vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 40, 0, cas(1, "c"), Outcome::Unknown),
            ev(3, 50, 60, Op::Get, read("c", 3)),
            ev(3, 70, 80, cas(3, "d"), written(4)),
        ];
        assert!(check(events).is_ok());
        // Never read: it may simply have failed.
        let events = vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(1, 20, 30, put("b"), written(2)),
            ev(2, 40, 0, cas(1, "c"), Outcome::Unknown),
            ev(3, 50, 60, Op::Get, read("b", 2)),
        ];
        assert!(check(events).is_ok());
    }

    #[test]
    fn unknown_revision_is_permissive_then_fixed_by_a_read() {
        // After an unknown put the revision is unknown: the cas may go either way.
        for outcome in [written(9), cas_failed()] {
            let events = vec![
                ev(1, 0, 0, put("a"), Outcome::Unknown),
                ev(2, 10, 20, Op::Delete, deleted(true)),
                ev(3, 30, 40, put("b"), written(5)),
                ev(4, 50, 0, put("c"), Outcome::Unknown),
                ev(5, 60, 70, cas(8, "d"), outcome),
            ];
            assert!(check(events).is_ok());
        }
        // Once a read fixed the revision, the cas has to agree with it.
        assert_violation(vec![
            ev(1, 0, 0, put("c"), Outcome::Unknown),
            ev(2, 10, 20, Op::Get, read("c", 6)),
            ev(3, 30, 40, cas(6, "d"), cas_failed()),
        ]);
    }

    #[test]
    fn delete_semantics() {
        let events = vec![
            ev(1, 0, 10, Op::Delete, deleted(false)),
            ev(1, 20, 30, put("a"), written(1)),
            ev(2, 40, 50, Op::Delete, deleted(true)),
            ev(2, 60, 70, Op::Get, absent()),
            ev(1, 80, 90, cas(0, "b"), written(3)),
            ev(2, 100, 110, Op::Get, read("b", 3)),
        ];
        assert!(check(events).is_ok());
        // Deleting an absent key cannot report it existed, and vice versa.
        assert_violation(vec![ev(1, 0, 10, Op::Delete, deleted(true))]);
        assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 30, Op::Delete, deleted(false)),
        ]);
        // A read after a completed delete sees nothing.
        assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 30, Op::Delete, deleted(true)),
            ev(1, 40, 50, Op::Get, read("a", 1)),
        ]);
        // Two concurrent deletes cannot both find the key.
        assert_violation(vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(2, 20, 40, Op::Delete, deleted(true)),
            ev(3, 20, 40, Op::Delete, deleted(true)),
        ]);
    }

    #[test]
    fn mismatched_result_is_violation() {
        assert_violation(vec![ev(1, 0, 10, put("a"), deleted(false))]);
    }

    #[test]
    fn keys_are_checked_separately() {
        let mut events = vec![
            ev(1, 0, 10, put("a"), written(1)),
            ev(1, 20, 30, Op::Get, read("a", 1)),
        ];
        // Interleaved on another key: the same values would be stale for "k".
        let other = |client, invoke, complete, op, outcome| Event {
            key: "other".to_owned(),
            ..ev(client, invoke, complete, op, outcome)
        };
        events.push(other(2, 5, 15, put("x"), written(2)));
        events.push(other(2, 40, 50, Op::Get, read("x", 2)));
        assert!(check(events.clone()).is_ok());

        events.push(other(3, 60, 70, put("y"), written(3)));
        events.push(other(3, 80, 90, Op::Get, read("x", 2)));
        let violation = assert_violation(events);
        assert_eq!(violation.key, "other");
        assert!(violation.history.iter().all(|e| e.key == "other"));
        assert!(violation.to_string().starts_with("key \"other\""));
    }

    #[test]
    fn display_lists_events_by_invocation() {
        let violation = Violation {
            key: K.to_owned(),
            reason: NOT_LINEARIZABLE.to_owned(),
            gave_up: false,
            history: vec![
                ev(2, 3_500_000, 0, put("b"), Outcome::Unknown),
                ev(1, 1_000_000, 2_250_000, Op::Get, read("a", 1)),
            ],
        };
        let text = violation.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "key \"k\": not linearizable (2 events)");
        assert!(lines[1].contains("client 1"), "{text}");
        assert!(lines[1].contains("1.000 ..        2.250 ms"), "{text}");
        assert!(lines[1].contains("read \"a\" rev=1"), "{text}");
        assert!(lines[2].contains("put \"b\""), "{text}");
        assert!(
            lines[2].contains("3.500 ..            ? ms  -> unknown"),
            "{text}"
        );
    }

    // -----------------------------------------------------------------------
    // Generated histories.

    /// xorshift64* — deterministic, seeded.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn percent(&mut self, p: u64) -> bool {
            self.below(100) < p
        }
    }

    struct Sim {
        clients: u64,
        ops: usize,
        keys: usize,
        unknown_percent: u64,
        max_gap: u64,
        max_len: u64,
    }

    /// Clients issuing operations on an atomic store: each operation takes
    /// effect at a random point of its interval (an unknown one: at a random
    /// later point, or never).
    fn simulate(seed: u64, sim: &Sim) -> Vec<Event> {
        let mut rng = Rng::new(seed);
        let mut cursor = vec![0u64; usize::try_from(sim.clients).unwrap()];
        let mut events = Vec::with_capacity(sim.ops);
        let mut effect_at = Vec::with_capacity(sim.ops);
        let mut lost = Vec::with_capacity(sim.ops);
        for n in 0..sim.ops {
            let client = (0..cursor.len()).min_by_key(|&c| (cursor[c], c)).unwrap();
            let invoke = cursor[client] + rng.below(sim.max_gap + 1);
            let len = 1 + rng.below(sim.max_len);
            let complete = invoke + len;
            cursor[client] = complete;
            let unknown = rng.percent(sim.unknown_percent);
            let value = format!("v{n}");
            let op = match rng.below(10) {
                0..=3 => Op::Get,
                4..=6 => Op::Put { value },
                7..=8 => Op::Cas {
                    expect_revision: 0,
                    value,
                },
                _ => Op::Delete,
            };
            let at = if !unknown {
                Some(invoke + rng.below(len + 1))
            } else if rng.percent(50) {
                Some(invoke + rng.below(3 * len + 1))
            } else {
                None
            };
            effect_at.push(at);
            lost.push(unknown);
            events.push(Event {
                client: u64::try_from(client).unwrap() + 1,
                key: format!("key{}", rng.below(u64::try_from(sim.keys).unwrap())),
                op,
                invoke,
                outcome: Outcome::Unknown,
                complete,
            });
        }

        let mut order: Vec<(u64, usize)> = effect_at
            .iter()
            .enumerate()
            .filter_map(|(i, at)| at.map(|at| (at, i)))
            .collect();
        order.sort_unstable();
        let mut store: HashMap<String, (String, u64)> = HashMap::new();
        let mut revision = 0;
        for (_, i) in order {
            let event = &mut events[i];
            let current = store.get(&event.key).cloned();
            let ret = match &mut event.op {
                Op::Get => Ret::Read(current),
                Op::Put { value } => {
                    revision += 1;
                    store.insert(event.key.clone(), (value.clone(), revision));
                    Ret::Written { revision }
                }
                Op::Cas {
                    expect_revision,
                    value,
                } => {
                    let actual = current.map_or(0, |(_, r)| r);
                    *expect_revision = match rng.below(4) {
                        0 | 1 => actual,
                        2 => 0,
                        _ => actual.saturating_sub(1 + rng.below(3)),
                    };
                    if *expect_revision == actual {
                        revision += 1;
                        store.insert(event.key.clone(), (value.clone(), revision));
                        Ret::Written { revision }
                    } else {
                        Ret::CasFailed
                    }
                }
                Op::Delete => {
                    revision += 1;
                    Ret::Deleted {
                        existed: store.remove(&event.key).is_some(),
                    }
                }
            };
            // Lost replies stay unknown, whether or not they took effect.
            if !lost[i] {
                event.outcome = Outcome::Ok(ret);
            }
        }
        events
    }

    fn unknowns(events: &[Event]) -> usize {
        events
            .iter()
            .filter(|e| e.outcome == Outcome::Unknown && e.op != Op::Get)
            .count()
    }

    fn states_for(events: &[Event]) -> (Verdict, usize) {
        let mut refs: Vec<&Event> = events.iter().collect();
        refs.sort_by_key(|e| e.invoke);
        check_key(&refs, DEFAULT_MAX_STATES)
    }

    const BIG: Sim = Sim {
        clients: 5,
        ops: 2_000,
        keys: 1,
        unknown_percent: 2,
        max_gap: 50_000,
        max_len: 200_000,
    };

    #[test]
    fn generated_history_passes_quickly() {
        for seed in 1..=4 {
            let events = simulate(seed, &BIG);
            let unknown = unknowns(&events);
            assert!((10..=60).contains(&unknown), "{unknown} unknown ops");
            let started = Instant::now();
            let (verdict, states) = states_for(&events);
            assert_eq!(verdict, Verdict::Linearizable, "seed {seed}");
            assert!(states < 20 * events.len(), "seed {seed}: {states} states");
            println!(
                "seed {seed}: {} ops, {unknown} unknown, {states} states, {:?}",
                events.len(),
                started.elapsed()
            );
            assert!(History::from(events).check().is_ok());
        }
        // Several keys, checked separately.
        let sim = Sim {
            keys: 3,
            ops: 3_000,
            ..BIG
        };
        assert!(History::from(simulate(7, &sim)).check().is_ok());
    }

    /// Changes the result of a read in the second half of the history to a
    /// value that was definitely overwritten before the read was invoked.
    fn make_stale(events: &mut [Event]) -> usize {
        let effective = |e: &Event| {
            matches!(
                e.outcome,
                Outcome::Ok(Ret::Written { .. } | Ret::Deleted { existed: true })
            )
        };
        let writes: Vec<usize> = (0..events.len())
            .filter(|&i| matches!(events[i].outcome, Outcome::Ok(Ret::Written { .. })))
            .collect();
        for g in events.len() / 2..events.len() {
            let Outcome::Ok(Ret::Read(Some((seen, _)))) = &events[g].outcome else {
                continue;
            };
            for &w in &writes {
                let (write, get) = (&events[w], &events[g]);
                let (Op::Put { value } | Op::Cas { value, .. }) = &write.op else {
                    continue;
                };
                let Outcome::Ok(Ret::Written { revision }) = write.outcome else {
                    continue;
                };
                let overwritten = events
                    .iter()
                    .any(|o| effective(o) && o.invoke > write.complete && o.complete < get.invoke);
                if value != seen && write.complete < get.invoke && overwritten {
                    let stale = read(value, revision);
                    events[g].outcome = stale;
                    return g;
                }
            }
        }
        panic!("no read to make stale");
    }

    #[test]
    fn generated_history_with_stale_read_fails() {
        let mut events = simulate(3, &BIG);
        let g = make_stale(&mut events);
        let stale = events[g].clone();
        let started = Instant::now();
        let (verdict, states) = states_for(&events);
        assert_eq!(verdict, Verdict::Violated);
        let checked = started.elapsed();
        let violation = History::from(events).check().unwrap_err();
        println!(
            "stale read {g}: {states} states, {checked:?}; with shrinking {:?}\n{violation}",
            started.elapsed()
        );
        assert_eq!(violation.reason, NOT_LINEARIZABLE);
        assert_eq!(violation.key, "key0");
        assert!(violation.history.contains(&stale), "{violation}");
        assert!(violation.history.len() < g, "{violation}");
        // Shrinking finished: no effect-free operation left can be removed.
        let needed: Vec<usize> = (0..violation.history.len())
            .filter(|&i| without_effect(&violation.history[i]))
            .collect();
        assert!(needed.len() <= 5, "{violation}");
        for i in needed {
            let mut rest = violation.history.clone();
            rest.remove(i);
            assert!(History::from(rest).check().is_ok(), "{violation}");
        }
    }

    #[test]
    fn search_gives_up_past_its_limit() {
        let events = simulate(5, &BIG);
        let violation = History::from(events.clone())
            .check_with_limit(100)
            .unwrap_err();
        assert!(violation.gave_up);
        assert_eq!(violation.reason, "search gave up after 101 states");
        assert_eq!(violation.history.len(), events.len());
        assert!(History::from(events).check().is_ok());
    }

    // -----------------------------------------------------------------------
    // Cross-check against exhaustive enumeration on small histories.

    /// Whether some order of the operations, respecting real time, is legal;
    /// unknown operations may be left out. No memo, no reveal, no pruning.
    fn brute_force(events: &[Event]) -> bool {
        let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for e in events {
            by_key.entry(&e.key).or_default().push(e);
        }
        by_key.values_mut().all(|events| {
            events.sort_by_key(|e| e.invoke);
            let model = KeyModel::build(events, false);
            let mut done = vec![false; model.ops.len()];
            extend(&model.ops, &mut done, State::default())
        })
    }

    fn extend(ops: &[KeyOp], done: &mut [bool], state: State) -> bool {
        if ops.iter().zip(&*done).all(|(op, &d)| d || !op.definite) {
            return true;
        }
        for i in 0..ops.len() {
            let minimal = (0..ops.len())
                .all(|j| done[j] || j == i || ops[j].ret.is_none_or(|ret| ret >= ops[i].call));
            if done[i] || !minimal {
                continue;
            }
            if let Some(next) = step(state, ops[i].kind) {
                done[i] = true;
                if extend(ops, done, next) {
                    return true;
                }
                done[i] = false;
            }
        }
        false
    }

    /// Replaces one result with a random, often wrong, one.
    fn mutate(rng: &mut Rng, events: &mut [Event]) {
        let i = usize::try_from(rng.below(events.len() as u64)).unwrap();
        let value = format!("v{}", rng.below(events.len() as u64 + 1));
        let revision = rng.below(6);
        events[i].outcome = match rng.below(6) {
            0 => Outcome::Unknown,
            1 => read(&value, revision),
            2 => absent(),
            3 => written(revision),
            4 => cas_failed(),
            _ => deleted(rng.percent(50)),
        };
    }

    /// Random small histories (valid ones, most then given a wrong result)
    /// checked against [`brute_force`]; returns (linearizable, not).
    fn cross_check(seed: u64, cases: u64, max_ops: u64, unknown: (u64, u64)) -> (usize, usize) {
        let mut rng = Rng::new(seed);
        let (mut passed, mut failed) = (0, 0);
        for case in 0..cases {
            let sim = Sim {
                clients: 2 + rng.below(3),
                ops: usize::try_from(3 + rng.below(max_ops - 2)).unwrap(),
                keys: 1 + usize::try_from(rng.below(2)).unwrap(),
                unknown_percent: unknown.0 + rng.below(unknown.1 - unknown.0),
                max_gap: rng.below(4),
                max_len: 1 + rng.below(6),
            };
            let mut events = simulate(seed * cases + case, &sim);
            assert!(History::from(events.clone()).check().is_ok(), "{events:#?}");
            if rng.percent(70) {
                mutate(&mut rng, &mut events);
            }
            let expected = brute_force(&events);
            let got = History::from(events.clone()).check();
            assert_eq!(got.is_ok(), expected, "case {case}: {events:#?}\n{got:?}");
            if let Err(violation) = got {
                failed += 1;
                // The reported sub-history fails on its own.
                assert!(!brute_force(&violation.history), "case {case}: {violation}");
                assert!(violation.history.len() <= events.len());
            } else {
                passed += 1;
            }
        }
        println!("{passed} linearizable, {failed} not");
        (passed, failed)
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let (passed, failed) = cross_check(42, 4_000, 8, (10, 50));
        assert!(passed > 1_000 && failed > 1_000, "{passed} / {failed}");
    }

    #[test]
    fn agrees_with_brute_force_with_many_unknown_outcomes() {
        let (passed, failed) = cross_check(43, 3_000, 9, (40, 90));
        assert!(passed > 1_000 && failed > 500, "{passed} / {failed}");
    }
}
