//! One conformance suite, run against every backend: memory, SQLite in a
//! temporary directory, and a real PostgreSQL (a fresh database per test,
//! dropped after it). PostgreSQL is found at `COUNTERSIGN_TEST_POSTGRES`
//! (default `postgres://root@127.0.0.1:5432/test`, the machine's trust-auth
//! server); its tests fail, never skip, when it is unreachable.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use sqlx::Connection;

use super::*;

const WINDOW: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

#[derive(Debug, Clone, Copy)]
enum Kind {
    Memory,
    Sqlite,
    Postgres,
}

/// A store, and a second handle onto the same data (as another process or
/// replica would have; the same handle for memory).
struct Fixture {
    store: Arc<dyn ApprovalStore>,
    other: Arc<dyn ApprovalStore>,
}

/// What to clean up after a test.
struct Guard {
    _dir: Option<tempfile::TempDir>,
    database: Option<String>,
}

fn admin_url() -> String {
    std::env::var("COUNTERSIGN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

/// Runs one statement on the admin connection (creating or dropping a
/// test's database).
async fn admin(sql: &str) {
    let url = admin_url();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap_or_else(|e| {
        panic!("PostgreSQL for the store tests at {url} (COUNTERSIGN_TEST_POSTGRES): {e}")
    });
    sqlx::query(sql).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

fn database_url(name: &str) -> String {
    let mut url = url::Url::parse(&admin_url()).expect("COUNTERSIGN_TEST_POSTGRES is a URL");
    url.set_path(name);
    url.to_string()
}

async fn setup(kind: Kind) -> (Fixture, Guard) {
    match kind {
        Kind::Memory => {
            let store = memory();
            let fixture = Fixture {
                other: store.clone(),
                store,
            };
            (
                fixture,
                Guard {
                    _dir: None,
                    database: None,
                },
            )
        }
        Kind::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("countersign.db");
            let store = open_sqlite(&path).await.unwrap();
            let other = open_sqlite(&path).await.unwrap();
            (
                Fixture { store, other },
                Guard {
                    _dir: Some(dir),
                    database: None,
                },
            )
        }
        Kind::Postgres => {
            let name = format!("cs_test_{}", uuid::Uuid::new_v4().simple());
            admin(&format!("CREATE DATABASE {name}")).await;
            let guard = Guard {
                _dir: None,
                database: Some(name.clone()),
            };
            let url = database_url(&name);
            let store = open_postgres(&url).await.unwrap();
            let other = open_postgres(&url).await.unwrap();
            (Fixture { store, other }, guard)
        }
    }
}

async fn teardown(guard: Guard) {
    if let Some(name) = guard.database {
        admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
    }
}

type Case = fn(Fixture) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs a case, then cleans up whether or not it panicked.
async fn run(kind: Kind, case: Case) {
    let (fixture, guard) = setup(kind).await;
    let outcome = tokio::spawn(case(fixture)).await;
    teardown(guard).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

macro_rules! suite {
    ($kind:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                super::run($kind, |f| Box::pin(super::$case(f))).await;
            }
        )*
    };
}

macro_rules! cases {
    ($kind:expr) => {
        suite!($kind;
            attach_by_fingerprint,
            attach_by_idempotency_key,
            replay_window_and_sweep,
            concurrent_inserts_create_one,
            concurrent_claims_succeed_once,
            transitions,
            finish_records_the_answer_and_drops_the_body,
            leases,
            heartbeats_keep_every_lease_of_a_process,
            orphans,
            unknown_outcomes,
            list_filters,
            count_pending,
            sweep_retention,
            ciba_progress_and_redaction,
            ping,
            inserts_are_leased_to_their_process,
            the_per_person_limit_holds_under_a_burst,
            asked_at_most_once,
            the_token_holder_claims_whoever_leases,
            released_leases_are_adopted_at_once,
            orphans_include_our_own_stranded_approvals,
            the_sweep_drops_answers_past_the_replay_window,
            a_delivered_answer_answers_no_further_call,
            only_a_done_approval_is_delivered,
            a_delivered_answer_with_a_key_is_replayed_within_the_window,
            calls_racing_a_delivery_make_at_most_one_new_approval,
            a_countersigned_call_keeps_its_tokens_until_it_ends,
            shadow_decisions_are_kept_listed_and_swept,
        );
    };
}

mod memory {
    cases!(super::Kind::Memory);
}

mod sqlite {
    cases!(super::Kind::Sqlite);
}

mod postgres {
    cases!(super::Kind::Postgres);
}

/// As a gateway inserts: leased to its process (here one long gone, so
/// that the lease tests start from a free approval), no per-person limit.
fn terms() -> InsertTerms<'static> {
    InsertTerms {
        replay_window: WINDOW,
        lease_owner: "creator",
        lease_until: SystemTime::now() - MINUTE,
        max_pending: usize::MAX,
    }
}

/// Now, at the stores' millisecond precision.
fn now() -> SystemTime {
    from_ms(now_ms())
}

fn call(id: &str, subject: &str, fingerprint: &str, key: Option<&str>) -> NewApproval {
    let t0 = now();
    NewApproval {
        id: id.into(),
        policy: "buy".into(),
        subject: subject.into(),
        upstream: "shop".into(),
        fingerprint: fingerprint.into(),
        idempotency_key: key.map(str::to_owned),
        binding_message: "Buy 2 XYZ phone".into(),
        authorization_details: Some(json!([{"type": "purchase", "item": "XYZ phone", "qty": 2}])),
        request: StoredRequest {
            method: "POST".into(),
            path_and_query: "/orders?express=1".into(),
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("x-binary".into(), vec![0xff, 0x00, 0x80]),
            ],
            body: br#"{"item":"XYZ phone","qty":2}"#.to_vec(),
        },
        created_at: t0,
        expires_at: t0 + 5 * MINUTE,
        parent_id: None,
        countersign_min: None,
        trace_parent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    }
}

fn at(mut approval: NewApproval, created_at: SystemTime) -> NewApproval {
    approval.created_at = created_at;
    approval.expires_at = created_at + 5 * MINUTE;
    approval
}

async fn create(store: &Arc<dyn ApprovalStore>, approval: &NewApproval) {
    match store.insert_or_attach(approval, terms()).await.unwrap() {
        Inserted::Created => {}
        Inserted::Existing(e) => panic!("{} attached to {}", approval.id, e.id),
        Inserted::LimitReached => panic!("{} hit the limit", approval.id),
    }
}

async fn attach(store: &Arc<dyn ApprovalStore>, approval: &NewApproval) -> Approval {
    match store.insert_or_attach(approval, terms()).await.unwrap() {
        Inserted::Created => panic!("{} was created", approval.id),
        Inserted::Existing(e) => *e,
        Inserted::LimitReached => panic!("{} hit the limit", approval.id),
    }
}

async fn get(store: &Arc<dyn ApprovalStore>, id: &str) -> Approval {
    store.get(id).await.unwrap().expect("stored")
}

async fn state(store: &Arc<dyn ApprovalStore>, id: &str) -> ApprovalState {
    get(store, id).await.state
}

fn ids(approvals: &[Approval]) -> Vec<&str> {
    approvals.iter().map(|a| a.id.as_str()).collect()
}

/// Pending -> Approved -> Forwarding, as the engine does.
async fn claim(store: &Arc<dyn ApprovalStore>, id: &str) {
    use ApprovalState::*;
    assert!(store.transition(id, Pending, Approved, None).await.unwrap());
    assert!(store
        .transition(id, Approved, Forwarding, None)
        .await
        .unwrap());
}

/// Moves `id` from `from` to `to` (with that problem code), asserting that
/// it happened.
async fn moved(
    store: &Arc<dyn ApprovalStore>,
    id: &str,
    from: ApprovalState,
    to: ApprovalState,
    problem_code: Option<&str>,
) {
    let happened = store.transition(id, from, to, problem_code).await.unwrap();
    assert!(happened, "{id}: {from:?} -> {to:?}");
}

/// What `owner` would adopt now, as the engine asks.
async fn adoptable(store: &Arc<dyn ApprovalStore>, owner: &str) -> Vec<Approval> {
    store.orphans(store.now(), 10, owner).await.unwrap()
}

/// Runs `task` `n` times at once, alternately on the store and on the
/// other handle (another process), and returns what each run returned, in
/// order.
async fn race<T, F, Fut>(f: &Fixture, n: usize, task: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, Arc<dyn ApprovalStore>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let store = if i % 2 == 0 { &f.store } else { &f.other };
            tokio::spawn(task(i, store.clone()))
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

async fn attach_by_fingerprint(f: Fixture) {
    let first = call("a1", "alice", "fp1", None);
    create(&f.store, &first).await;

    let stored = get(&f.store, "a1").await;
    assert_eq!(stored.id, "a1");
    assert_eq!(stored.policy, "buy");
    assert_eq!(stored.subject, "alice");
    assert_eq!(stored.upstream, "shop");
    assert_eq!(stored.fingerprint, "fp1");
    assert_eq!(stored.idempotency_key, None);
    assert_eq!(stored.binding_message, first.binding_message);
    assert_eq!(stored.authorization_details, first.authorization_details);
    assert_eq!(stored.trace_parent, first.trace_parent);
    assert_eq!(stored.request.method, "POST");
    assert_eq!(stored.request.path_and_query, "/orders?express=1");
    assert_eq!(stored.request.headers, first.request.headers);
    assert_eq!(stored.request.body, first.request.body);
    assert_eq!(stored.created_at, first.created_at);
    assert_eq!(stored.expires_at, first.expires_at);
    assert_eq!(stored.updated_at, first.created_at);
    assert_eq!(stored.state, ApprovalState::Pending);
    assert!(stored.ciba.is_none() && stored.response.is_none());
    assert!(stored.problem_code.is_none() && stored.decided_at.is_none());
    assert_eq!(stored.lease_owner.as_deref(), Some("creator"));
    assert!(stored.asked_at.is_none());

    // The retry, on either handle, attaches: no second approval.
    assert_eq!(
        attach(&f.store, &call("a2", "alice", "fp1", None)).await.id,
        "a1"
    );
    assert_eq!(
        attach(&f.other, &call("a3", "alice", "fp1", None)).await.id,
        "a1"
    );
    assert!(f.store.get("a2").await.unwrap().is_none());
    // Someone else's identical call, or another call, is its own.
    create(&f.store, &call("b1", "bob", "fp1", None)).await;
    create(&f.store, &call("a4", "alice", "fp2", None)).await;
    assert!(f.store.get("missing").await.unwrap().is_none());

    // A failed approval (the authorization server or upstream was not
    // reachable) is not replayed: the retry asks again.
    moved(
        &f.store,
        "a4",
        ApprovalState::Pending,
        ApprovalState::Failed,
        Some("approval_failed"),
    )
    .await;
    create(&f.other, &call("a5", "alice", "fp2", None)).await;
}

async fn attach_by_idempotency_key(f: Fixture) {
    create(&f.store, &call("k1", "alice", "fp1", Some("K"))).await;
    let again = attach(&f.other, &call("k2", "alice", "fp1", Some("K"))).await;
    assert_eq!(again.id, "k1");
    assert_eq!(again.idempotency_key.as_deref(), Some("K"));

    let reuse = f
        .store
        .insert_or_attach(&call("k3", "alice", "fp2", Some("K")), terms())
        .await;
    assert!(matches!(reuse, Err(StoreError::KeyReuse)), "{reuse:?}");
    assert!(f.store.get("k3").await.unwrap().is_none());

    // Without the key, the same call is matched by fingerprint only.
    create(&f.store, &call("k4", "alice", "fp1", None)).await;
    // Keys are per person.
    create(&f.store, &call("k5", "bob", "fp2", Some("K"))).await;
}

async fn replay_window_and_sweep(f: Fixture) {
    use ApprovalState::*;
    let t0 = now();
    create(&f.store, &call("r1", "alice", "fp1", None)).await;
    moved(&f.store, "r1", Pending, Denied, Some("access_denied")).await;

    // Within the window a final approval still answers retries.
    let retry = attach(
        &f.store,
        &at(call("r2", "alice", "fp1", None), t0 + 10 * MINUTE),
    )
    .await;
    assert_eq!(retry.id, "r1");
    assert_eq!(retry.state, Denied);
    assert_eq!(retry.problem_code.as_deref(), Some("access_denied"));

    // Past it, even before a sweep, the same call is a new approval...
    create(
        &f.other,
        &at(call("r3", "alice", "fp1", None), t0 + 2 * WINDOW),
    )
    .await;
    // ...and a non-final one stays attachable however old.
    let later = at(call("r4", "alice", "fp1", None), t0 + 5 * WINDOW);
    assert_eq!(attach(&f.store, &later).await.id, "r3");

    // A key can be used for another call once its approval left the window.
    create(&f.store, &call("k1", "alice", "fp1", Some("K"))).await;
    moved(&f.store, "k1", Pending, Denied, Some("access_denied")).await;
    let other_call = at(call("k2", "alice", "fp2", Some("K")), t0 + 10 * MINUTE);
    assert!(matches!(
        f.store.insert_or_attach(&other_call, terms()).await,
        Err(StoreError::KeyReuse)
    ));
    f.store
        .sweep(t0 + 2 * WINDOW, WINDOW, 30 * DAY)
        .await
        .unwrap();
    // The sweep detached it: the key is free for another call.
    create(&f.other, &other_call).await;
    let r1 = get(&f.store, "r1").await;
    assert_eq!(r1.state, Denied, "kept for the retention period");
    assert!(r1.request.body.is_empty());
}

async fn concurrent_inserts_create_one(f: Fixture) {
    let answers = race(&f, 20, |i, store| async move {
        store
            .insert_or_attach(&call(&format!("c{i}"), "alice", "fp1", None), terms())
            .await
            .unwrap()
    })
    .await;
    let mut created = 0;
    let mut attached = Vec::new();
    for answer in answers {
        match answer {
            Inserted::Created => created += 1,
            Inserted::Existing(e) => attached.push(e.id),
            Inserted::LimitReached => panic!("no limit was set"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(attached.len(), 19);
    let all = f.store.list(&ListFilter::default()).await.unwrap();
    assert_eq!(all.len(), 1);
    assert!(attached.iter().all(|id| *id == all[0].id));
}

async fn concurrent_claims_succeed_once(f: Fixture) {
    use ApprovalState::*;
    create(&f.store, &call("x1", "alice", "fp1", None)).await;
    moved(&f.store, "x1", Pending, Approved, None).await;
    let claims = race(&f, 20, |_, store| async move {
        store
            .transition("x1", Approved, Forwarding, None)
            .await
            .unwrap()
    })
    .await;
    let claimed = claims.into_iter().filter(|claimed| *claimed).count();
    assert_eq!(claimed, 1);
    assert_eq!(state(&f.store, "x1").await, Forwarding);
}

async fn transitions(f: Fixture) {
    use ApprovalState::*;
    let t0 = now();
    create(&f.store, &call("t1", "alice", "fp1", None)).await;
    assert!(!f
        .store
        .transition("t1", Approved, Forwarding, None)
        .await
        .unwrap());
    moved(&f.store, "t1", Pending, Approved, None).await;
    let approved = get(&f.store, "t1").await;
    assert_eq!(approved.state, Approved);
    let decided = approved.decided_at.expect("decided");
    assert!(decided >= t0 && approved.updated_at >= t0);
    assert!(!approved.request.body.is_empty(), "kept until forwarded");

    moved(&f.other, "t1", Approved, Forwarding, None).await;
    assert!(!f
        .store
        .transition("t1", Approved, Forwarding, None)
        .await
        .unwrap());
    let forwarding = get(&f.store, "t1").await;
    assert_eq!(
        forwarding.decided_at,
        Some(decided),
        "the decision's time is kept"
    );

    // A final state ends it: decided, code recorded, body, headers and lease
    // dropped.
    create(&f.store, &call("t2", "alice", "fp2", None)).await;
    assert!(f.store.lease("t2", "me", t0 + MINUTE).await.unwrap());
    moved(&f.store, "t2", Pending, Expired, Some("expired_token")).await;
    let expired = get(&f.store, "t2").await;
    assert_eq!(expired.state, Expired);
    assert_eq!(expired.problem_code.as_deref(), Some("expired_token"));
    assert!(expired.decided_at.is_some());
    assert!(expired.request.body.is_empty());
    assert!(expired.request.headers.is_empty());
    assert!(expired.lease_owner.is_none() && expired.lease_until.is_none());
    // Final states never change again.
    assert!(!f
        .store
        .transition("t2", Expired, Pending, None)
        .await
        .unwrap());
    assert!(!f
        .store
        .transition("t2", Expired, Failed, None)
        .await
        .unwrap());
    assert_eq!(state(&f.store, "t2").await, Expired);
    assert!(!f
        .store
        .transition("missing", Pending, Approved, None)
        .await
        .unwrap());
}

async fn finish_records_the_answer_and_drops_the_body(f: Fixture) {
    let t0 = now();
    create(&f.store, &call("f1", "alice", "fp1", None)).await;
    let response = StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: Some(br#"{"order":42}"#.to_vec()),
    };
    assert!(
        !f.store.finish("f1", &response).await.unwrap(),
        "not claimed"
    );
    assert!(f.store.lease("f1", "me", t0 + MINUTE).await.unwrap());
    claim(&f.store, "f1").await;
    assert!(f.store.finish("f1", &response).await.unwrap());
    assert!(!f.other.finish("f1", &response).await.unwrap(), "once");

    let done = get(&f.store, "f1").await;
    assert_eq!(done.state, ApprovalState::Done);
    let stored = done.response.expect("response");
    assert_eq!(stored.status, 201);
    assert_eq!(stored.headers, response.headers);
    assert_eq!(stored.body, response.body);
    assert!(done.request.body.is_empty());
    assert!(
        done.request.headers.is_empty(),
        "request headers dropped once done"
    );
    assert!(done.lease_owner.is_none() && done.lease_until.is_none());
    assert!(done.decided_at.is_some());

    // Too large to replay: recorded without a body.
    create(&f.store, &call("f2", "alice", "fp2", None)).await;
    claim(&f.store, "f2").await;
    let large = StoredResponse {
        status: 200,
        headers: Vec::new(),
        body: None,
    };
    assert!(f.store.finish("f2", &large).await.unwrap());
    let done = get(&f.store, "f2").await.response.expect("response");
    assert_eq!(done.status, 200);
    assert!(done.body.is_none() && done.headers.is_empty());
}

async fn leases(f: Fixture) {
    use ApprovalState::*;
    let t0 = now();
    create(&f.store, &call("l1", "alice", "fp1", None)).await;
    assert!(f.store.lease("l1", "A", t0 + MINUTE).await.unwrap());
    assert!(!f.other.lease("l1", "B", t0 + MINUTE).await.unwrap());
    assert!(
        f.store.lease("l1", "A", t0 + 2 * MINUTE).await.unwrap(),
        "renewed"
    );
    let leased = get(&f.other, "l1").await;
    assert_eq!(leased.lease_owner.as_deref(), Some("A"));
    assert_eq!(leased.lease_until, Some(t0 + 2 * MINUTE));

    // A's lease runs out (here: renewed into the past): B takes over.
    assert!(f.store.lease("l1", "A", t0 - MINUTE).await.unwrap());
    assert!(f.other.lease("l1", "B", t0 + MINUTE).await.unwrap());
    assert!(!f.store.lease("l1", "A", t0 + MINUTE).await.unwrap());
    assert_eq!(get(&f.store, "l1").await.lease_owner.as_deref(), Some("B"));

    // A forwarder keeps its lease while forwarding.
    claim(&f.store, "l1").await;
    assert!(f.other.lease("l1", "B", t0 + 2 * MINUTE).await.unwrap());
    assert!(!f.store.lease("l1", "A", t0 + MINUTE).await.unwrap());

    // No lease on a final approval, nor on a missing one.
    create(&f.store, &call("l2", "alice", "fp2", None)).await;
    moved(&f.store, "l2", Pending, Denied, None).await;
    assert!(!f.store.lease("l2", "A", t0 + MINUTE).await.unwrap());
    assert!(!f.store.lease("missing", "A", t0 + MINUTE).await.unwrap());
}

async fn heartbeats_keep_every_lease_of_a_process(f: Fixture) {
    use ApprovalState::*;
    let t0 = now();
    for (i, id) in ["h1", "h2", "h3"].iter().enumerate() {
        create(&f.store, &call(id, "alice", &format!("fp{i}"), None)).await;
    }
    // A leases h1 and h2 briefly (their own leases have run out) and beats;
    // B leases h3 and does not.
    assert!(f.store.lease("h1", "A", t0 - MINUTE).await.unwrap());
    assert!(f.store.lease("h2", "A", t0 - MINUTE).await.unwrap());
    assert!(f.other.lease("h3", "B", t0 - MINUTE).await.unwrap());
    f.store.heartbeat("A", t0 + MINUTE).await.unwrap();

    // While A beats, its approvals are nobody else's, whatever their lease.
    assert!(!f.other.lease("h1", "B", t0 + MINUTE).await.unwrap());
    assert_eq!(
        ids(&f.other.orphans(t0, 10, "nobody").await.unwrap()),
        ["h3"]
    );
    claim(&f.store, "h2").await;
    assert!(f.store.lease("h2", "A", t0 - MINUTE).await.unwrap());
    assert_eq!(f.other.mark_unknown_outcomes(t0).await.unwrap(), 0);

    // A stops beating: B takes over h1, and A's forward is unknown.
    let later = t0 + 2 * MINUTE;
    assert_eq!(
        ids(&f.other.orphans(later, 10, "nobody").await.unwrap()),
        ["h1", "h3"]
    );
    assert_eq!(f.other.mark_unknown_outcomes(later).await.unwrap(), 1);
    assert_eq!(get(&f.other, "h2").await.state, OutcomeUnknown);
    f.store.heartbeat("A", t0 - MINUTE).await.unwrap();
    assert!(f.other.lease("h1", "B", t0 + MINUTE).await.unwrap());
    assert_eq!(get(&f.store, "h1").await.lease_owner.as_deref(), Some("B"));
}

async fn orphans(f: Fixture) {
    use ApprovalState::*;
    let t0 = now();
    let ms = Duration::from_millis(1);
    for (i, id) in ["o1", "o2", "o3", "o4", "o5", "o6"].iter().enumerate() {
        let fingerprint = format!("fp{i}");
        let approval = at(call(id, "alice", &fingerprint, None), t0 + ms * i as u32);
        create(&f.store, &approval).await;
    }
    // o1: free. o2: leased. o3: lease expired. o4: approved, free.
    // o5: forwarding. o6: denied.
    assert!(f.store.lease("o2", "A", t0 + MINUTE).await.unwrap());
    assert!(f.store.lease("o3", "A", t0 - MINUTE).await.unwrap());
    moved(&f.store, "o4", Pending, Approved, None).await;
    claim(&f.store, "o5").await;
    moved(&f.store, "o6", Pending, Denied, None).await;

    let found = f.other.orphans(t0, 10, "nobody").await.unwrap();
    assert_eq!(ids(&found), ["o1", "o3", "o4"]);
    assert_eq!(
        ids(&f.store.orphans(t0, 2, "nobody").await.unwrap()),
        ["o1", "o3"]
    );
    let later = f
        .store
        .orphans(t0 + 2 * MINUTE, 10, "nobody")
        .await
        .unwrap();
    assert_eq!(ids(&later), ["o1", "o2", "o3", "o4"]);
}

async fn unknown_outcomes(f: Fixture) {
    use ApprovalState::*;
    let t0 = now();
    for (i, id) in ["u1", "u2", "u3", "u4"].iter().enumerate() {
        create(&f.store, &call(id, "alice", &format!("fp{i}"), None)).await;
    }
    // u1: the forwarder's lease ran out. u2: still forwarding under a lease.
    // u3: approved, not claimed. u4: claimed without a lease.
    assert!(f.store.lease("u1", "A", t0 - MINUTE).await.unwrap());
    claim(&f.store, "u1").await;
    assert!(f.store.lease("u2", "A", t0 + MINUTE).await.unwrap());
    claim(&f.store, "u2").await;
    assert!(f.store.lease("u3", "A", t0 - MINUTE).await.unwrap());
    moved(&f.store, "u3", Pending, Approved, None).await;
    claim(&f.store, "u4").await;

    assert_eq!(f.other.mark_unknown_outcomes(t0).await.unwrap(), 2);
    for id in ["u1", "u4"] {
        let unknown = get(&f.store, id).await;
        assert_eq!(unknown.state, OutcomeUnknown);
        assert_eq!(unknown.problem_code.as_deref(), Some("outcome_unknown"));
        assert!(unknown.lease_owner.is_none() && unknown.request.body.is_empty());
        assert!(unknown.decided_at.is_some());
    }
    assert_eq!(state(&f.store, "u2").await, Forwarding);
    assert_eq!(state(&f.store, "u3").await, Approved);
    // The dead forwarder's answer, should it arrive, is not recorded.
    let response = StoredResponse {
        status: 200,
        headers: Vec::new(),
        body: Some(Vec::new()),
    };
    assert!(!f.store.finish("u1", &response).await.unwrap());

    assert_eq!(f.store.mark_unknown_outcomes(t0).await.unwrap(), 0);
    assert_eq!(
        f.store
            .mark_unknown_outcomes(t0 + 2 * MINUTE)
            .await
            .unwrap(),
        1
    );
    assert_eq!(state(&f.store, "u2").await, OutcomeUnknown);
}

/// How many approvals of `subject` are pending.
async fn pending_of(store: &Arc<dyn ApprovalStore>, subject: &str) -> usize {
    let filter = ListFilter {
        state: Some(ApprovalState::Pending),
        subject: Some(subject.to_owned()),
        ..ListFilter::default()
    };
    store.list(&filter).await.unwrap().len()
}

async fn count_pending(f: Fixture) {
    use ApprovalState::*;
    for (id, subject) in [
        ("c1", "alice"),
        ("c2", "alice"),
        ("c3", "bob"),
        ("c4", "alice"),
    ] {
        create(&f.store, &call(id, subject, id, None)).await;
    }
    moved(&f.store, "c2", Pending, Denied, None).await;
    assert_eq!(pending_of(&f.other, "alice").await, 2);
    assert_eq!(pending_of(&f.other, "bob").await, 1);
    assert_eq!(pending_of(&f.other, "carol").await, 0);
}

async fn list_filters(f: Fixture) {
    use ApprovalState::*;
    let t0 = now();
    let second = Duration::from_secs(1);
    for (i, (id, policy, subject)) in [
        ("l1", "buy", "alice"),
        ("l2", "buy", "bob"),
        ("l3", "refund", "alice"),
        ("l4", "buy", "alice"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut approval = at(call(id, subject, id, None), t0 + second * i as u32);
        approval.policy = policy.into();
        create(&f.store, &approval).await;
    }
    moved(&f.store, "l2", Pending, Approved, None).await;
    moved(&f.store, "l3", Pending, Denied, None).await;

    let list = |filter: ListFilter| {
        let store = f.other.clone();
        async move { store.list(&filter).await.unwrap() }
    };
    assert_eq!(
        ids(&list(ListFilter::default()).await),
        ["l4", "l3", "l2", "l1"]
    );
    let pending = ListFilter {
        state: Some(Pending),
        ..Default::default()
    };
    assert_eq!(ids(&list(pending).await), ["l4", "l1"]);
    let buy = ListFilter {
        policy: Some("buy".into()),
        ..Default::default()
    };
    assert_eq!(ids(&list(buy).await), ["l4", "l2", "l1"]);
    let alice = ListFilter {
        subject: Some("alice".into()),
        ..Default::default()
    };
    assert_eq!(ids(&list(alice).await), ["l4", "l3", "l1"]);
    let recent = ListFilter {
        since: Some(t0 + 2 * second),
        ..Default::default()
    };
    assert_eq!(ids(&list(recent).await), ["l4", "l3"]);
    let two = ListFilter {
        limit: Some(2),
        ..Default::default()
    };
    assert_eq!(ids(&list(two).await), ["l4", "l3"]);
    let all_of_them = ListFilter {
        state: Some(Pending),
        policy: Some("buy".into()),
        subject: Some("alice".into()),
        since: Some(t0),
        limit: Some(10),
    };
    assert_eq!(ids(&list(all_of_them).await), ["l4", "l1"]);
    let none = ListFilter {
        subject: Some("carol".into()),
        ..Default::default()
    };
    assert!(list(none).await.is_empty());
}

async fn sweep_retention(f: Fixture) {
    use ApprovalState::*;
    let t0 = now();
    create(&f.store, &call("s1", "alice", "fp1", None)).await;
    moved(&f.store, "s1", Pending, Denied, None).await;
    create(&f.store, &call("s2", "alice", "fp2", None)).await;
    claim(&f.store, "s2").await;
    let response = StoredResponse {
        status: 200,
        headers: Vec::new(),
        body: Some(b"ok".to_vec()),
    };
    assert!(f.store.finish("s2", &response).await.unwrap());
    // s3: pending, long expired and forgotten. s4: pending, long-lived.
    create(&f.store, &call("s3", "alice", "fp3", None)).await;
    let mut long = call("s4", "alice", "fp4", None);
    long.expires_at = t0 + 60 * DAY;
    create(&f.store, &long).await;

    f.store.sweep(t0 + WINDOW, MINUTE, 30 * DAY).await.unwrap();
    assert_eq!(f.store.list(&ListFilter::default()).await.unwrap().len(), 4);
    assert!(get(&f.store, "s2").await.response.is_some());
    assert_eq!(get(&f.store, "s4").await.request.body, long.request.body);

    f.other
        .sweep(t0 + 31 * DAY, MINUTE, 30 * DAY)
        .await
        .unwrap();
    let left = f.store.list(&ListFilter::default()).await.unwrap();
    assert_eq!(ids(&left), ["s4"]);
    assert_eq!(left[0].request.body, long.request.body);
}

async fn ciba_progress_and_redaction(f: Fixture) {
    let t0 = now();
    create(&f.store, &call("p1", "alice", "fp1", None)).await;
    let ciba = CibaProgress {
        auth_req_id: Secret::new("auth-req-7f3a"),
        interval: Duration::from_secs(10),
        next_poll_at: t0 + Duration::from_secs(10),
        deadline: t0 + 5 * MINUTE,
    };
    f.store.set_ciba("p1", &ciba).await.unwrap();
    let stored = get(&f.other, "p1").await.ciba.expect("ciba");
    assert_eq!(stored.auth_req_id.expose(), "auth-req-7f3a");
    assert_eq!(stored.interval, ciba.interval);
    assert_eq!(stored.next_poll_at, ciba.next_poll_at);
    assert_eq!(stored.deadline, ciba.deadline);

    // slow_down: the interval grows.
    let slower = CibaProgress {
        interval: Duration::from_secs(15),
        next_poll_at: t0 + Duration::from_secs(25),
        ..ciba
    };
    f.store.set_ciba("p1", &slower).await.unwrap();
    let approval = get(&f.store, "p1").await;
    assert_eq!(approval.ciba.as_ref().unwrap().interval, slower.interval);
    f.store.set_ciba("missing", &slower).await.unwrap();

    // What a log line of an approval would show.
    let printed = format!("{approval:?}");
    for secret in ["auth-req-7f3a", "XYZ phone", "purchase", "application/json"] {
        assert!(!printed.contains(secret), "{secret} in {printed}");
    }
    assert!(printed.contains("content-type") && printed.contains("/orders?express=1"));
}

async fn ping(f: Fixture) {
    f.store.ping().await.unwrap();
    f.other.ping().await.unwrap();
}

#[tokio::test]
async fn sqlite_persists_across_reopen() {
    use ApprovalState::*;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("countersign.db");
    let store = open_sqlite(&path).await.unwrap();
    create(&store, &call("p1", "alice", "fp1", Some("K"))).await;
    create(&store, &call("p2", "alice", "fp2", None)).await;
    claim(&store, "p2").await;
    let ciba = CibaProgress {
        auth_req_id: Secret::new("auth-req-1"),
        interval: Duration::from_secs(5),
        next_poll_at: now(),
        deadline: now() + MINUTE,
    };
    store.set_ciba("p1", &ciba).await.unwrap();
    drop(store);

    // As after a restart (or kill -9: every change is committed when made).
    let store = open_sqlite(&path).await.unwrap();
    let p1 = get(&store, "p1").await;
    assert_eq!(p1.state, Pending);
    assert_eq!(p1.ciba.unwrap().auth_req_id.expose(), "auth-req-1");
    assert_eq!(p1.request.body, call("x", "y", "z", None).request.body);
    assert_eq!(state(&store, "p2").await, Forwarding);
    assert_eq!(
        attach(&store, &call("p3", "alice", "fp1", Some("K")))
            .await
            .id,
        "p1"
    );
    assert_eq!(store.mark_unknown_outcomes(now()).await.unwrap(), 1);
}

#[tokio::test]
async fn open_errors_say_what_without_secrets() {
    let err = open_postgres("postgres://countersign:hunter2@127.0.0.1:1/approvals")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let err = open_postgres("mysql://countersign:hunter2@localhost/x")
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains("hunter2"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-directory").join("countersign.db");
    let err = open_sqlite(&missing).await.unwrap_err().to_string();
    assert!(err.contains("cannot open"), "{err}");
}

/// Opened on a short-lived runtime (as before pingora starts), used from
/// another after the first is gone.
fn usable_across_runtimes(kind: Kind) {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (fixture, guard) = runtime().block_on(setup(kind));
    let other = runtime();
    other.block_on(async {
        create(&fixture.store, &call("r1", "alice", "fp1", None)).await;
        assert_eq!(
            attach(&fixture.other, &call("r2", "alice", "fp1", None))
                .await
                .id,
            "r1"
        );
        fixture.store.ping().await.unwrap();
    });
    drop(fixture);
    other.block_on(teardown(guard));
}

#[test]
fn sqlite_is_usable_across_runtimes() {
    usable_across_runtimes(Kind::Sqlite);
}

#[test]
fn postgres_is_usable_across_runtimes() {
    usable_across_runtimes(Kind::Postgres);
}

#[test]
fn states_parse_what_they_print() {
    for state in ApprovalState::ALL {
        assert_eq!(ApprovalState::parse(state.as_str()), Some(state));
    }
    assert_eq!(ApprovalState::parse("Pending"), None);
    let finals: Vec<_> = ApprovalState::ALL
        .into_iter()
        .filter(|s| s.is_final())
        .map(ApprovalState::as_str)
        .collect();
    assert_eq!(
        finals,
        ["denied", "expired", "failed", "done", "outcome_unknown"]
    );
}

#[test]
fn attach_keys() {
    let mut approval = call("a", "alice", "abc", None);
    assert_eq!(attach_key(&approval), "fp:alice:abc");
    approval.idempotency_key = Some("k-1".into());
    assert_eq!(attach_key(&approval), "key:alice:k-1");
}

async fn inserts_are_leased_to_their_process(f: Fixture) {
    let terms = InsertTerms {
        lease_owner: "A",
        lease_until: f.store.now() + MINUTE,
        ..terms()
    };
    let approval = call("n1", "alice", "fp1", None);
    assert!(matches!(
        f.store.insert_or_attach(&approval, terms).await.unwrap(),
        Inserted::Created
    ));
    let stored = get(&f.other, "n1").await;
    assert_eq!(stored.lease_owner.as_deref(), Some("A"));
    // Nobody adopts it before A asks, even with no heartbeat of A yet.
    assert!(!f.other.lease("n1", "B", now() + MINUTE).await.unwrap());
    assert!(adoptable(&f.other, "B").await.is_empty());
}

async fn the_per_person_limit_holds_under_a_burst(f: Fixture) {
    let limited = InsertTerms {
        max_pending: 5,
        ..terms()
    };
    let answers = race(&f, 20, |i, store| async move {
        let approval = call(&format!("b{i}"), "alice", &format!("fp{i}"), None);
        store.insert_or_attach(&approval, limited).await.unwrap()
    })
    .await;
    let mut created = 0;
    let mut refused = 0;
    for answer in answers {
        match answer {
            Inserted::Created => created += 1,
            Inserted::LimitReached => refused += 1,
            Inserted::Existing(e) => panic!("attached to {}", e.id),
        }
    }
    assert_eq!((created, refused), (5, 15));
    assert_eq!(pending_of(&f.store, "alice").await, 5);
    // Another person is not limited by alice's; a retry of alice's
    // attaches at the limit.
    let bob = call("bob1", "bob", "fp0", None);
    assert!(matches!(
        f.store.insert_or_attach(&bob, limited).await.unwrap(),
        Inserted::Created
    ));
    let pending = f
        .store
        .list(&ListFilter {
            subject: Some("alice".into()),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    let retry = call("again", "alice", &pending[0].fingerprint, None);
    assert!(matches!(
        f.other.insert_or_attach(&retry, limited).await.unwrap(),
        Inserted::Existing(_)
    ));
}

async fn asked_at_most_once(f: Fixture) {
    use ApprovalState::*;
    let terms = InsertTerms {
        lease_owner: "A",
        lease_until: f.store.now() + MINUTE,
        ..terms()
    };
    f.store
        .insert_or_attach(&call("a1", "alice", "fp1", None), terms)
        .await
        .unwrap();
    assert!(!f.other.mark_asked("a1", "B").await.unwrap(), "not B's");
    assert!(f.store.mark_asked("a1", "A").await.unwrap());
    assert!(!f.other.mark_asked("a1", "A").await.unwrap(), "asked once");
    assert!(get(&f.other, "a1").await.asked_at.is_some());
    f.store
        .insert_or_attach(&call("a2", "alice", "fp2", None), terms)
        .await
        .unwrap();
    moved(&f.store, "a2", Pending, Denied, None).await;
    assert!(!f.store.mark_asked("a2", "A").await.unwrap(), "final");
}

async fn the_token_holder_claims_whoever_leases(f: Fixture) {
    use ApprovalState::*;
    create(&f.store, &call("t1", "alice", "fp1", None)).await;
    assert!(f.store.lease("t1", "B", now() + MINUTE).await.unwrap());
    let until = f.store.now() + MINUTE;
    assert!(f.store.claim("t1", "A", until).await.unwrap());
    assert!(!f.other.claim("t1", "B", until).await.unwrap(), "once");
    let claimed = get(&f.other, "t1").await;
    assert_eq!(claimed.state, Forwarding);
    assert_eq!(claimed.lease_owner.as_deref(), Some("A"));
    // Settled first elsewhere: nothing to claim.
    create(&f.store, &call("t2", "alice", "fp2", None)).await;
    moved(&f.other, "t2", Pending, Expired, None).await;
    assert!(!f.store.claim("t2", "A", until).await.unwrap());
}

async fn released_leases_are_adopted_at_once(f: Fixture) {
    use ApprovalState::*;
    for (i, id) in ["v1", "v2"].iter().enumerate() {
        create(&f.store, &call(id, "alice", &format!("fp{i}"), None)).await;
        assert!(f.store.lease(id, "A", now() + MINUTE).await.unwrap());
    }
    f.store.heartbeat("A", now() + MINUTE).await.unwrap();
    claim(&f.store, "v2").await;
    assert!(adoptable(&f.other, "B").await.is_empty());
    f.store.release("A").await.unwrap();
    // The pending one is free at once; the forward in flight keeps its
    // lease (it becomes outcome_unknown only once that runs out).
    assert_eq!(ids(&adoptable(&f.other, "B").await), ["v1"]);
    assert_eq!(state(&f.other, "v2").await, Forwarding);
    assert!(f.other.lease("v1", "B", now() + MINUTE).await.unwrap());
}

async fn orphans_include_our_own_stranded_approvals(f: Fixture) {
    create(&f.store, &call("s1", "alice", "fp1", None)).await;
    assert!(f.store.lease("s1", "A", now() + MINUTE).await.unwrap());
    f.store.heartbeat("A", now() + MINUTE).await.unwrap();
    let now = f.store.now();
    assert!(f.other.orphans(now, 10, "B").await.unwrap().is_empty());
    assert_eq!(ids(&f.store.orphans(now, 10, "A").await.unwrap()), ["s1"]);
}

async fn the_sweep_drops_answers_past_the_replay_window(f: Fixture) {
    let t0 = now();
    create(&f.store, &call("w1", "alice", "fp1", None)).await;
    let progress = CibaProgress {
        auth_req_id: Secret::new("req-w1".to_owned()),
        interval: Duration::from_secs(5),
        next_poll_at: t0,
        deadline: t0 + MINUTE,
    };
    f.store.set_ciba("w1", &progress).await.unwrap();
    claim(&f.store, "w1").await;
    let answer = StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: Some(b"{\"order\":1}".to_vec()),
    };
    assert!(f.store.finish("w1", &answer).await.unwrap());
    f.store.sweep(t0 + MINUTE, WINDOW, 30 * DAY).await.unwrap();
    let kept = get(&f.other, "w1").await;
    assert!(kept.response.unwrap().body.is_some(), "within the window");
    assert!(kept.ciba.is_some());
    f.store
        .sweep(t0 + 2 * WINDOW, WINDOW, 30 * DAY)
        .await
        .unwrap();
    let swept = get(&f.other, "w1").await;
    assert_eq!(swept.state, ApprovalState::Done, "kept for the audit trail");
    let response = swept.response.expect("status kept");
    assert_eq!(response.status, 201);
    assert!(response.body.is_none(), "no retry can need it");
    assert!(swept.ciba.is_none(), "auth_req_id dropped");
}

/// Pending -> ... -> Done with an answer, as the engine forwards.
async fn done(store: &Arc<dyn ApprovalStore>, id: &str) {
    claim(store, id).await;
    let answer = StoredResponse {
        status: 200,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: Some(br#"{"order":"ord-1"}"#.to_vec()),
    };
    assert!(store.finish(id, &answer).await.unwrap());
}

async fn a_delivered_answer_answers_no_further_call(f: Fixture) {
    create(&f.store, &call("d1", "alice", "fp1", None)).await;
    done(&f.store, "d1").await;
    // Not yet delivered (the agent hung up): the retry gets the answer.
    assert_eq!(
        attach(&f.other, &call("d2", "alice", "fp1", None)).await.id,
        "d1"
    );
    assert!(get(&f.store, "d1").await.delivered_at.is_none());

    let before = now();
    assert!(f.other.mark_delivered("d1").await.unwrap());
    assert!(
        !f.store.mark_delivered("d1").await.unwrap(),
        "the first only"
    );
    let delivered = get(&f.store, "d1").await;
    let at = delivered.delivered_at.expect("delivered_at");
    assert!(at >= before && at <= now() + MINUTE, "{at:?}");
    assert_eq!(delivered.state, ApprovalState::Done);
    assert_eq!(
        delivered.updated_at,
        get(&f.other, "d1").await.updated_at,
        "the same row"
    );
    assert!(
        delivered.response.unwrap().body.is_some(),
        "kept for the status resource and the audit trail"
    );

    // The same call again, on either handle, is a new approval...
    create(&f.store, &call("d3", "alice", "fp1", None)).await;
    // ...which its own retries attach to.
    assert_eq!(
        attach(&f.other, &call("d4", "alice", "fp1", None)).await.id,
        "d3"
    );
}

async fn only_a_done_approval_is_delivered(f: Fixture) {
    use ApprovalState::*;
    create(&f.store, &call("p1", "alice", "fp1", None)).await;
    assert!(!f.store.mark_delivered("p1").await.unwrap(), "pending");
    assert!(!f.store.mark_delivered("missing").await.unwrap());
    assert_eq!(
        attach(&f.other, &call("p2", "alice", "fp1", None)).await.id,
        "p1"
    );
    // A denial told to the agent is still told to its retries (within the
    // window): the person is not asked again about what they refused.
    moved(&f.store, "p1", Pending, Denied, Some("access_denied")).await;
    assert!(!f.store.mark_delivered("p1").await.unwrap(), "denied");
    let retry = attach(&f.other, &call("p3", "alice", "fp1", None)).await;
    assert_eq!((retry.id.as_str(), retry.state), ("p1", Denied));
    assert!(retry.delivered_at.is_none());
}

async fn a_delivered_answer_with_a_key_is_replayed_within_the_window(f: Fixture) {
    let t0 = now();
    create(&f.store, &call("k1", "alice", "fp1", Some("K"))).await;
    done(&f.store, "k1").await;
    assert!(f.store.mark_delivered("k1").await.unwrap());
    // The key says "the same operation": replayed, as often as asked.
    for retry in ["k2", "k3"] {
        let again = attach(&f.other, &call(retry, "alice", "fp1", Some("K"))).await;
        assert_eq!(again.id, "k1");
        assert!(again.delivered_at.is_some());
    }
    // The key still names one call only.
    assert!(matches!(
        f.store
            .insert_or_attach(&call("k4", "alice", "fp2", Some("K")), terms())
            .await,
        Err(StoreError::KeyReuse)
    ));
    // Past the window, a new approval.
    create(
        &f.store,
        &at(call("k5", "alice", "fp1", Some("K")), t0 + 2 * WINDOW),
    )
    .await;
    // The same call without the key was never delivered anything.
    create(&f.store, &call("n1", "alice", "fp1", None)).await;
}

async fn calls_racing_a_delivery_make_at_most_one_new_approval(f: Fixture) {
    create(&f.store, &call("d1", "alice", "fp1", None)).await;
    done(&f.store, "d1").await;
    // The sixth task delivers d1's answer; the others repeat its call.
    let answers = race(&f, 16, |i, store| async move {
        if i == 5 {
            assert!(store.mark_delivered("d1").await.unwrap());
            return None;
        }
        let repeat = call(&format!("r{i}"), "alice", "fp1", None);
        match store.insert_or_attach(&repeat, terms()).await.unwrap() {
            Inserted::Created => Some(repeat.id),
            Inserted::Existing(e) => Some(e.id),
            Inserted::LimitReached => panic!("no limit was set"),
        }
    })
    .await;
    let mut answered_by: Vec<String> = answers.into_iter().flatten().collect();
    // Each call got d1's answer (before the delivery) or the one new
    // approval made after it, never a second new one.
    answered_by.sort();
    answered_by.dedup();
    answered_by.retain(|id| id != "d1");
    assert!(answered_by.len() <= 1, "{answered_by:?}");
    let next = call("z", "alice", "fp1", None);
    match f.other.insert_or_attach(&next, terms()).await.unwrap() {
        Inserted::Existing(e) => assert_eq!(Some(&e.id), answered_by.first()),
        Inserted::Created => assert!(answered_by.is_empty()),
        Inserted::LimitReached => panic!("no limit was set"),
    }
}

/// A countersigned call: the person's approval and a countersigner's, each
/// keeping its token once approved; the claim takes the call from
/// `approved`; closing the family drops every token.
async fn a_countersigned_call_keeps_its_tokens_until_it_ends(f: Fixture) {
    let parent = NewApproval {
        countersign_min: Some(1),
        ..call("p1", "alice", "fp1", None)
    };
    let child = NewApproval {
        parent_id: Some("p1".into()),
        ..call("c1", "bob", "countersign:p1:bob", None)
    };
    let other = NewApproval {
        parent_id: Some("p1".into()),
        ..call("c2", "carol", "countersign:p1:carol", None)
    };
    for approval in [&parent, &child, &other] {
        create(&f.store, approval).await;
    }
    let grant = |token: &str| KeptGrant {
        token: Secret::new(token.to_owned()),
        dpop: token.starts_with("dpop"),
    };
    assert!(f.store.keep_grant("p1", &grant("tok-alice")).await.unwrap());
    assert!(!f.other.keep_grant("p1", &grant("again")).await.unwrap());
    assert!(f.other.keep_grant("c1", &grant("dpop-bob")).await.unwrap());
    let p1 = get(&f.other, "p1").await;
    assert_eq!(p1.state, ApprovalState::Approved);
    assert_eq!(p1.countersign_min, Some(1));
    assert_eq!(p1.grant.unwrap().token.expose(), "tok-alice");
    assert!(format!("{:?}", get(&f.store, "c1").await).contains("[redacted]"));
    let family = f.other.family("p1").await.unwrap();
    let members: Vec<(&str, ApprovalState)> = family
        .iter()
        .map(|a| (a.subject.as_str(), a.state))
        .collect();
    assert_eq!(
        members,
        [
            ("bob", ApprovalState::Approved),
            ("carol", ApprovalState::Pending)
        ]
    );
    let bob = family[0].grant.as_ref().unwrap();
    assert!(bob.dpop);
    assert_eq!(bob.token.expose(), "dpop-bob");
    // Claimed once, from approved.
    let until = SystemTime::now() + MINUTE;
    assert!(f.store.claim("p1", "me", until).await.unwrap());
    assert!(!f.other.claim("p1", "me", until).await.unwrap());
    f.store
        .close_children("p1", true, "countersign_not_needed")
        .await
        .unwrap();
    let family = f.store.family("p1").await.unwrap();
    assert_eq!(family[0].state, ApprovalState::Done);
    assert_eq!(family[1].state, ApprovalState::Failed);
    assert_eq!(
        family[1].problem_code.as_deref(),
        Some("countersign_not_needed")
    );
    assert!(family.iter().all(|a| a.grant.is_none()));
    let answer = StoredResponse {
        status: 201,
        headers: Vec::new(),
        body: Some(b"{}".to_vec()),
    };
    assert!(f.store.finish("p1", &answer).await.unwrap());
    assert!(get(&f.store, "p1").await.grant.is_none());

    // Refused: the sentence is kept, the tokens are not.
    let parent = NewApproval {
        countersign_min: Some(1),
        ..call("p2", "alice", "fp2", None)
    };
    create(&f.store, &parent).await;
    assert!(f.store.keep_grant("p2", &grant("tok")).await.unwrap());
    assert!(f
        .other
        .end_parent(
            "p2",
            ApprovalState::Denied,
            "access_denied",
            "denied by carol"
        )
        .await
        .unwrap());
    assert!(!f
        .store
        .end_parent("p2", ApprovalState::Expired, "approval_expired", "late")
        .await
        .unwrap());
    let p2 = get(&f.store, "p2").await;
    assert_eq!(p2.state, ApprovalState::Denied);
    assert_eq!(p2.problem_detail.as_deref(), Some("denied by carol"));
    assert!(p2.grant.is_none());
}

/// What shadow policies would have done: kept whole, listed newest first
/// by policy, person and time, swept with the approvals' retention.
async fn shadow_decisions_are_kept_listed_and_swept(f: Fixture) {
    let t0 = now();
    let decision = |id: &str, subject: Option<&str>, at: SystemTime| ShadowDecision {
        id: id.into(),
        policy: "buy".into(),
        subject: subject.map(str::to_owned),
        decision: "hold".into(),
        problem_code: None,
        binding_message: Some("Buy 2".into()),
        countersigners: vec!["bob".into()],
        method: "POST".into(),
        path: "/shop".into(),
        created_at: at,
    };
    let old = decision("s1", Some("alice"), t0 - 10 * MINUTE);
    let new = decision("s2", Some("alice"), t0);
    let nobody = ShadowDecision {
        decision: "refuse".into(),
        problem_code: Some("identity_required".into()),
        binding_message: None,
        countersigners: Vec::new(),
        policy: "other".into(),
        ..decision("s3", None, t0)
    };
    for d in [&old, &new, &nobody] {
        f.store.record_shadow(d).await.unwrap();
    }
    let all = f.other.list_shadow(&ShadowFilter::default()).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[2], old, "oldest last, kept whole");
    let alice = ShadowFilter {
        subject: Some("alice".into()),
        ..ShadowFilter::default()
    };
    let ids: Vec<String> = f
        .other
        .list_shadow(&alice)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["s2", "s1"]);
    let other = ShadowFilter {
        policy: Some("other".into()),
        ..ShadowFilter::default()
    };
    assert_eq!(f.store.list_shadow(&other).await.unwrap(), [nobody]);
    f.store.sweep(t0, WINDOW, 5 * MINUTE).await.unwrap();
    let left: Vec<String> = f
        .store
        .list_shadow(&ShadowFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.contains(&"s1".to_owned()));
}
