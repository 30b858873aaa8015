//! The Kafka destination (`[destination] type = "kafka"`), on librdkafka (bundled with the
//! `rdkafka` crate).
//!
//! Safety, whatever the pass-through settings say: the idempotent producer, `acks=all`, at most
//! 5 requests in flight per connection (librdkafka keeps each partition's order with those).
//! The record key is the event's userId, else its anonymousId, so one user's events stay in one
//! partition, in commit order; the value is the event's JSON; the headers are `lsn`, `op`,
//! `table` and `messageId` ([`encoder`]).
//!
//! A batch is delivered only when every record of it has a successful delivery report; only
//! then does the checkpoint move. Each record's failure is sorted ([`classify`]):
//! - for good (too large, not authorised for the topic, an invalid topic or record): the event
//!   becomes a dead letter with the broker's reason, and the pipeline goes on;
//! - retriable (a broker down, a leader change, a timeout): the batch fails and is retried
//!   (`sink::retry`) with a new producer; what the retry sends again is every record not
//!   acknowledged, and every later record of the same key, so a key's records never overtake
//!   each other;
//! - a fatal error of the producer (fenced, out of sequence): the producer is built again and
//!   the batch retried; a cluster authorisation failure stops the pipeline.

mod config;
pub mod encoder;
mod sink;

pub use config::{Compression, KafkaConfig, RawKafkaConfig, Security, TopicSpec};
pub use sink::KafkaSink;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What a record's failure means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The broker will never take this record: dead-letter it.
    Permanent,
    /// Try the batch again later.
    Retriable,
    /// The producer cannot go on; build it again and retry.
    ProducerFatal,
    /// Nothing will work until an operator acts (stop the pipeline).
    Stop,
}

/// Sorts a produce or delivery error.
pub fn classify(error: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::PolicyViolation,
        ) => Failure::Permanent,
        Some(C::ClusterAuthorizationFailed) => Failure::Stop,
        Some(C::Fatal) => Failure::ProducerFatal,
        _ => Failure::Retriable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_gets_its_policy() {
        let produce = |c| KafkaError::MessageProduction(c);
        assert_eq!(
            classify(&produce(RDKafkaErrorCode::MessageSizeTooLarge)),
            Failure::Permanent
        );
        assert_eq!(
            classify(&produce(RDKafkaErrorCode::TopicAuthorizationFailed)),
            Failure::Permanent
        );
        assert_eq!(
            classify(&produce(RDKafkaErrorCode::MessageTimedOut)),
            Failure::Retriable
        );
        assert_eq!(
            classify(&produce(RDKafkaErrorCode::NotLeaderForPartition)),
            Failure::Retriable
        );
        assert_eq!(
            classify(&produce(RDKafkaErrorCode::AllBrokersDown)),
            Failure::Retriable
        );
        assert_eq!(
            classify(&produce(RDKafkaErrorCode::Fatal)),
            Failure::ProducerFatal
        );
        assert_eq!(
            classify(&produce(RDKafkaErrorCode::ClusterAuthorizationFailed)),
            Failure::Stop
        );
    }
}
