//! Schema changes in the middle of the stream, with `[mapping] columns` unset (= every
//! column): a column added by `ALTER TABLE … ADD COLUMN` flows into the traits of the changes
//! after it (with its default for rows written before it), while the changes before it keep
//! the old shape; a column whose type changes (`ALTER COLUMN … TYPE`, text → int) decodes with
//! the new type from then on (numbers, not strings). No full sync is triggered: the mapping
//! did not change.

use crate::support;

use serde_json::{Value, json};
use support::users_fixture;

#[tokio::test]
async fn added_and_retyped_columns_flow_into_traits() {
    let fx = users_fixture(
        "CREATE TABLE public.users (id bigserial PRIMARY KEY, user_id text, score text)",
        "",
        None,
    )
    .await;
    let c = fx.db.connect().await;
    c.batch_execute("INSERT INTO users (user_id, score) VALUES ('u_1', '10')")
        .await
        .unwrap();
    fx.run_once();
    assert_eq!(fx.events().len(), 1);

    c.batch_execute(
        "INSERT INTO users (user_id, score) VALUES ('u_2', '20');
         ALTER TABLE users ADD COLUMN vip boolean NOT NULL DEFAULT false;
         ALTER TABLE users ADD COLUMN tags text[];
         UPDATE users SET score = '11' WHERE user_id = 'u_1';
         INSERT INTO users (user_id, score, vip, tags) VALUES ('u_3', '30', true, '{a,b}');",
    )
    .await
    .unwrap();
    c.batch_execute(
        "ALTER TABLE users ALTER COLUMN score TYPE int USING score::int;
         UPDATE users SET score = score + 1 WHERE user_id = 'u_2';",
    )
    .await
    .unwrap();
    c.batch_execute("INSERT INTO users (user_id, score, vip) VALUES ('u_4', 40, true)")
        .await
        .unwrap();
    fx.run_once();

    let events = fx.events();
    let streamed: Vec<(&Value, &Value)> = events[1..]
        .iter()
        .map(|e| (&e["context"]["sources"]["op"], &e["traits"]))
        .collect();
    let expected = [
        (
            json!("insert"),
            json!({"id": 2, "user_id": "u_2", "score": "20"}),
        ),
        (
            json!("update"),
            json!({"id": 1, "user_id": "u_1", "score": "11", "vip": false, "tags": null}),
        ),
        (
            json!("insert"),
            json!({"id": 3, "user_id": "u_3", "score": "30", "vip": true, "tags": ["a", "b"]}),
        ),
        (
            json!("update"),
            json!({"id": 2, "user_id": "u_2", "score": 21, "vip": false, "tags": null}),
        ),
        (
            json!("insert"),
            json!({"id": 4, "user_id": "u_4", "score": 40, "vip": true, "tags": null}),
        ),
    ];
    assert_eq!(streamed.len(), expected.len(), "{events:#?}");
    for ((op, traits), (want_op, want_traits)) in streamed.iter().zip(&expected) {
        assert_eq!(*op, want_op, "{events:#?}");
        assert_eq!(*traits, want_traits, "{events:#?}");
    }
    // Not a new full sync: no snapshot events after the first.
    assert!(
        events[1..]
            .iter()
            .all(|e| e["context"]["sources"]["op"] != "snapshot")
    );
}
