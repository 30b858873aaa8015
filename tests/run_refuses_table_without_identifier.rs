//! `run` refuses a table without any identifier column (user_id, anonymous_id, email, or the
//! columns named under `[mapping.identifiers]`): exit 3, a message that names the table and
//! lists the columns it has, a hint, and nothing touched — no slot, no events.

use crate::support;

#[tokio::test(flavor = "multi_thread")]
async fn run_exits_3_listing_the_columns() {
    let fx = support::users_fixture(
        "CREATE TABLE public.users (id bigserial PRIMARY KEY, full_name text, plan text)",
        "",
        None,
    )
    .await;
    fx.db
        .connect()
        .await
        .batch_execute("INSERT INTO users (full_name, plan) VALUES ('Ann', 'pro')")
        .await
        .unwrap();

    for args in [&["--once"][..], &[][..]] {
        let (code, stdout, stderr) = fx.slotstream("run", args);
        let dump = format!("run {args:?}: exit {code}\n--- stdout\n{stdout}--- stderr\n{stderr}");
        assert_eq!(code, 3, "{dump}");
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no `error:` line\n{dump}"));
        assert!(
            error.contains("public.users"),
            "the error names the table\n{dump}"
        );
        assert!(
            error.contains("id") && error.contains("full_name") && error.contains("plan"),
            "the error lists the table's columns\n{dump}"
        );
        for wanted in ["user_id", "anonymous_id", "email"] {
            assert!(
                error.contains(wanted),
                "the error says {wanted} would do\n{dump}"
            );
        }
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("hint: ") && l.contains("[mapping.identifiers]")),
            "a hint says how to fix it\n{dump}"
        );
        assert!(!stderr.contains("panicked"), "{dump}");
        assert!(!stderr.contains("Caused by"), "no error chain\n{dump}");
    }

    let slots: i64 = fx
        .db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a refused run must not create the slot");
    assert!(fx.events().is_empty(), "a refused run sent events");
}
