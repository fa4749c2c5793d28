//! The fault schedule: which fault, on what, when and for how long, drawn
//! from the run's seed alone, so that `FAULT_SEED=<seed>` replays it.
//!
//! Faults run one after another (as Jepsen's nemesis does): each starts a
//! random gap after the previous one healed, so a failing run names one
//! fault at a time in its history.

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The two scenarios of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// One gateway on SQLite.
    SingleSqlite,
    /// Two gateways on one PostgreSQL database behind the suite's TCP proxy.
    ReplicasPostgres,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::SingleSqlite => "single_sqlite",
            Scenario::ReplicasPostgres => "replicas_postgres",
        }
    }

    pub fn replicas(self) -> usize {
        match self {
            Scenario::SingleSqlite => 1,
            Scenario::ReplicasPostgres => 2,
        }
    }
}

/// One kind of fault. Durations are how long the fault lasts before it is
/// healed (a pause, a stall, a partition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9`, then start again on the same configuration and store.
    Kill9 { replica: usize },
    /// `kill -STOP`, and `kill -CONT` after `pause` (longer than the lease).
    Pause { replica: usize, pause: Duration },
    /// SIGTERM (a rolling restart), then start again.
    Terminate { replica: usize },
    /// Restart the replica with its wall clock `offset_s` seconds off
    /// (libfaketime, monotonic clock untouched) for `lasts`, then restart
    /// it with the true clock.
    ClockSkew {
        replica: usize,
        offset_s: i64,
        lasts: Duration,
    },
    /// The TCP proxy in front of PostgreSQL resets every connection.
    PgCut,
    /// The TCP proxy stops forwarding (sockets stay open) for `lasts`.
    PgBlackhole { lasts: Duration },
    /// `pg_terminate_backend` on every connection to the run's database.
    PgTerminate,
    /// A second SQLite connection holds `BEGIN IMMEDIATE` for `lasts`.
    SqliteStall { lasts: Duration },
    /// The authorization server is frozen (`kill -STOP`) for `lasts`.
    PeerPause { lasts: Duration },
    /// The authorization server answers the next `count` bc-authorize
    /// requests `delay` late (it has asked the person already).
    PeerSlow { count: u32, delay: Duration },
    /// The next bc-authorize is answered `delay` late, and the replica is
    /// killed (-9) and restarted halfway through: a crash between asking
    /// the person and learning the `auth_req_id`, when a call came in.
    CrashWhileAsking { replica: usize, delay: Duration },
    /// The upstream answers each request only after `delay`, for `lasts`.
    UpstreamSlow { delay: Duration, lasts: Duration },
    /// The upstream reads each request and hangs up without an answer,
    /// for `lasts`.
    UpstreamHangUp { lasts: Duration },
}

impl Fault {
    /// The kind's name, for the summary's counts.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill9 { .. } => "kill9",
            Fault::Pause { .. } => "pause",
            Fault::Terminate { .. } => "sigterm",
            Fault::ClockSkew { .. } => "clock_skew",
            Fault::PgCut => "pg_cut",
            Fault::PgBlackhole { .. } => "pg_blackhole",
            Fault::PgTerminate => "pg_terminate",
            Fault::SqliteStall { .. } => "sqlite_stall",
            Fault::PeerPause { .. } => "peer_pause",
            Fault::PeerSlow { .. } => "peer_slow",
            Fault::CrashWhileAsking { .. } => "crash_while_asking",
            Fault::UpstreamSlow { .. } => "upstream_slow",
            Fault::UpstreamHangUp { .. } => "upstream_hangup",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |d: &Duration| format!("{:.1}s", d.as_secs_f64());
        match self {
            Fault::Kill9 { replica } => write!(f, "kill9 gw{replica}"),
            Fault::Pause { replica, pause } => write!(f, "pause gw{replica} {}", s(pause)),
            Fault::Terminate { replica } => write!(f, "sigterm gw{replica}"),
            Fault::ClockSkew {
                replica,
                offset_s,
                lasts,
            } => write!(f, "clock_skew gw{replica} {offset_s:+}s for {}", s(lasts)),
            Fault::PgCut => write!(f, "pg_cut"),
            Fault::PgBlackhole { lasts } => write!(f, "pg_blackhole {}", s(lasts)),
            Fault::PgTerminate => write!(f, "pg_terminate"),
            Fault::SqliteStall { lasts } => write!(f, "sqlite_stall {}", s(lasts)),
            Fault::PeerPause { lasts } => write!(f, "peer_pause {}", s(lasts)),
            Fault::PeerSlow { count, delay } => {
                write!(f, "peer_slow next {count} bc-authorize {} late", s(delay))
            }
            Fault::CrashWhileAsking { replica, delay } => {
                write!(
                    f,
                    "crash_while_asking gw{replica}, bc-authorize {} late",
                    s(delay)
                )
            }
            Fault::UpstreamSlow { delay, lasts } => {
                write!(f, "upstream_slow {} for {}", s(delay), s(lasts))
            }
            Fault::UpstreamHangUp { lasts } => write!(f, "upstream_hangup for {}", s(lasts)),
        }
    }
}

/// A fault and when it starts, from the start of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub at: Duration,
    pub fault: Fault,
}

/// How long the store's lease is in both scenarios (`store.lease`).
pub const LEASE: Duration = Duration::from_secs(2);

/// The time a fault keeps the system busy before the next may start
/// (its duration plus a restart), used to space the schedule.
fn busy_for(fault: &Fault) -> Duration {
    let restart = Duration::from_secs(2);
    match fault {
        Fault::Kill9 { .. } | Fault::Terminate { .. } => restart,
        Fault::Pause { pause, .. } => *pause,
        Fault::ClockSkew { lasts, .. } => *lasts + restart * 2,
        Fault::PgCut | Fault::PgTerminate => Duration::from_millis(200),
        Fault::PeerSlow { delay, .. } | Fault::CrashWhileAsking { delay, .. } => *delay + restart,
        Fault::PgBlackhole { lasts }
        | Fault::SqliteStall { lasts }
        | Fault::PeerPause { lasts }
        | Fault::UpstreamSlow { lasts, .. }
        | Fault::UpstreamHangUp { lasts } => *lasts,
    }
}

fn secs(rng: &mut StdRng, from: f64, to: f64) -> Duration {
    Duration::from_millis((rng.random_range(from..to) * 1000.0) as u64)
}

fn draw(rng: &mut StdRng, scenario: Scenario) -> Fault {
    let replica = rng.random_range(0..scenario.replicas());
    // Weights: process faults are the commonest in production and the ones
    // the engine promises most about.
    let common: [(u32, u8); 9] = [
        (5, 0), // kill9
        (4, 1), // pause
        (4, 2), // sigterm
        (2, 3), // peer pause
        (2, 4), // upstream slow
        (2, 5), // upstream hang-up
        (3, 6), // store fault (per scenario)
        (2, 7), // slow bc-authorize
        (2, 8), // crash while asking
    ];
    let total: u32 = common.iter().map(|(w, _)| w).sum();
    let mut pick = rng.random_range(0..total);
    let mut which = 0;
    for (weight, kind) in common {
        if pick < weight {
            which = kind;
            break;
        }
        pick -= weight;
    }
    match which {
        0 => Fault::Kill9 { replica },
        1 => Fault::Pause {
            replica,
            // Past the lease, and past two thirds of it where the heartbeat
            // lapses.
            pause: secs(rng, LEASE.as_secs_f64() + 0.5, LEASE.as_secs_f64() * 3.0),
        },
        2 => Fault::Terminate { replica },
        3 => Fault::PeerPause {
            lasts: secs(rng, 1.0, 5.0),
        },
        4 => Fault::UpstreamSlow {
            // Sometimes past the upstream's timeout (3 s + the client's 5 s).
            delay: secs(rng, 0.5, 10.0),
            lasts: secs(rng, 2.0, 8.0),
        },
        5 => Fault::UpstreamHangUp {
            lasts: secs(rng, 1.0, 5.0),
        },
        7 => Fault::PeerSlow {
            count: rng.random_range(1..4),
            delay: secs(rng, 1.0, 6.0),
        },
        8 => Fault::CrashWhileAsking {
            replica,
            delay: secs(rng, 2.0, 6.0),
        },
        _ => match scenario {
            Scenario::SingleSqlite => Fault::SqliteStall {
                // Around the gateway's 5 s busy timeout.
                lasts: secs(rng, 1.0, 8.0),
            },
            Scenario::ReplicasPostgres => match rng.random_range(0..4) {
                0 => Fault::PgCut,
                1 => Fault::PgBlackhole {
                    lasts: secs(rng, 1.0, 8.0),
                },
                2 => Fault::PgTerminate,
                _ => Fault::ClockSkew {
                    replica,
                    offset_s: [-20, -5, 3, 20][rng.random_range(0..4)],
                    lasts: secs(rng, 5.0, 15.0),
                },
            },
        },
    }
}

/// The schedule of a run of `seconds` from `seed`: faults one after the
/// other, each a random gap (0.5 to 4 s) after the previous one is over,
/// none starting in the first 3 s (the agents' first calls) nor after
/// `seconds`.
pub fn schedule(seed: u64, scenario: Scenario, seconds: u64) -> Vec<Planned> {
    // A scenario's own stream: the two scenarios of one seed differ.
    let mut rng = StdRng::seed_from_u64(seed ^ (scenario as u64 + 1).wrapping_mul(0x9E37_79B9));
    let end = Duration::from_secs(seconds);
    let mut at = Duration::from_secs(3);
    let mut planned = Vec::new();
    loop {
        at += secs(&mut rng, 0.5, 4.0);
        if at >= end {
            return planned;
        }
        let fault = draw(&mut rng, scenario);
        let busy = busy_for(&fault);
        planned.push(Planned { at, fault });
        at += busy;
    }
}

/// The seed of a random generator for `what` (an agent, the approver) in
/// a run of `seed`.
pub fn sub_seed(seed: u64, what: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed: stable across builds.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in what.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^ seed.rotate_left(17)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_schedule_every_time() {
        for scenario in [Scenario::SingleSqlite, Scenario::ReplicasPostgres] {
            assert_eq!(schedule(7, scenario, 600), schedule(7, scenario, 600));
            assert_ne!(schedule(7, scenario, 600), schedule(8, scenario, 600));
        }
    }

    #[test]
    fn faults_follow_one_another_within_the_run() {
        let planned = schedule(42, Scenario::ReplicasPostgres, 3600);
        assert!(planned.len() > 300, "{}", planned.len());
        for pair in planned.windows(2) {
            assert!(pair[0].at + busy_for(&pair[0].fault) <= pair[1].at);
        }
        assert!(planned.iter().all(|p| p.at < Duration::from_secs(3600)));
        let kinds: std::collections::BTreeSet<_> = planned.iter().map(|p| p.fault.kind()).collect();
        for kind in [
            "kill9",
            "pause",
            "sigterm",
            "clock_skew",
            "pg_cut",
            "pg_blackhole",
            "pg_terminate",
            "peer_pause",
            "peer_slow",
            "crash_while_asking",
            "upstream_slow",
            "upstream_hangup",
        ] {
            assert!(kinds.contains(kind), "{kind} never drawn: {kinds:?}");
        }
        assert!(!kinds.contains("sqlite_stall"));
        let single = schedule(42, Scenario::SingleSqlite, 3600);
        assert!(single.iter().any(|p| p.fault.kind() == "sqlite_stall"));
        assert!(single.iter().all(|p| !p.fault.kind().starts_with("pg_")));
        assert!(single.iter().all(|p| match p.fault {
            Fault::Kill9 { replica }
            | Fault::Pause { replica, .. }
            | Fault::Terminate { replica }
            | Fault::CrashWhileAsking { replica, .. } => replica == 0,
            _ => true,
        }));
    }

    #[test]
    fn pauses_outlast_the_lease() {
        for p in schedule(3, Scenario::SingleSqlite, 3600) {
            if let Fault::Pause { pause, .. } = p.fault {
                assert!(pause > LEASE);
            }
        }
    }
}
