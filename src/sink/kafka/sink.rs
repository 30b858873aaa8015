//! The producer: sends a batch's records, waits for every delivery report, sorts the failures;
//! the topic check; the flush at shutdown.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use super::config::KafkaConfig;
use super::{Failure, classify, encoder};
use crate::sink::{Batch, Rejected, Sink, SinkError, SinkFuture};

/// How long the topic check waits for the brokers.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the shutdown waits for records in flight.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// librdkafka's log and error callbacks, into `tracing`. Connection errors while a broker is
/// down are logged at debug: the failed deliveries are what the operator sees (once per
/// attempt, with the reason).
pub struct Logging;

impl ClientContext for Logging {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::warn!(facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning | RDKafkaLogLevel::Notice => {
                tracing::info!(facility = fac, "librdkafka: {message}")
            }
            _ => tracing::debug!(facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(error = %error, "librdkafka: {reason}");
    }
}

/// Writes events to a Kafka topic.
pub struct KafkaSink {
    config: KafkaConfig,
    producer: Option<FutureProducer<Logging>>,
    /// The batch's values, encoded once per attempt.
    buf: Vec<u8>,
}

/// A record sent and its delivery report to come.
struct InFlight {
    index: usize,
    future: DeliveryFuture,
}

/// What became of the records of one attempt.
struct Outcome {
    /// Per event of the batch: a record of it failed for a retriable (or worse) reason.
    failed: Vec<bool>,
    /// How many events failed so.
    failed_count: usize,
    /// Events refused for good, with the reason.
    rejected: Vec<Rejected>,
    /// The first retriable failure, for the error.
    first_error: Option<KafkaError>,
    /// A failure that stops the pipeline or needs a new producer.
    worst: Option<(Failure, KafkaError)>,
}

impl Outcome {
    fn new(events: usize) -> Self {
        Outcome {
            failed: vec![false; events],
            failed_count: 0,
            rejected: Vec::new(),
            first_error: None,
            worst: None,
        }
    }

    fn fail(&mut self, index: usize) {
        if !std::mem::replace(&mut self.failed[index], true) {
            self.failed_count += 1;
        }
    }

    fn record(&mut self, index: usize, error: KafkaError) {
        match classify(&error) {
            Failure::Permanent => {
                if !self.rejected.iter().any(|r| r.index == index) {
                    self.rejected.push(Rejected {
                        index,
                        reason: format!("the Kafka broker refused the record: {error}"),
                    });
                }
            }
            Failure::Retriable => {
                self.fail(index);
                self.first_error.get_or_insert(error);
            }
            f @ (Failure::ProducerFatal | Failure::Stop) => {
                self.fail(index);
                if self.worst.as_ref().is_none_or(|(w, _)| *w != Failure::Stop) {
                    self.worst = Some((f, error));
                }
            }
        }
    }
}

impl KafkaSink {
    /// A sink for `config`; the producer is made here (librdkafka connects in the background).
    pub fn new(config: &KafkaConfig) -> Result<Self, SinkError> {
        let mut sink = KafkaSink {
            config: config.clone(),
            producer: None,
            buf: Vec::new(),
        };
        sink.producer()?;
        Ok(sink)
    }

    fn error(&self, what: &str, message: String, retryable: bool, hint: &str) -> SinkError {
        SinkError::Kafka {
            what: format!("{what} (brokers {})", self.config.brokers),
            message,
            retryable,
            hint: hint.to_owned(),
        }
    }

    fn producer(&mut self) -> Result<&FutureProducer<Logging>, SinkError> {
        if self.producer.is_none() {
            tracing::debug!(
                brokers = %self.config.brokers,
                topic = %self.config.topic,
                options = %self.config.options_for_log(),
                "creating the Kafka producer"
            );
            let producer = self
                .config
                .client_config()
                .create_with_context(Logging)
                .map_err(|e| {
                    self.error(
                        "producer settings",
                        e.to_string(),
                        false,
                        "fix the [destination] keys or librdkafka_options named above",
                    )
                })?;
            self.producer = Some(producer);
        }
        self.producer.as_ref().ok_or_else(|| {
            self.error(
                "producer",
                "not available".into(),
                true,
                "this is a bug: report it",
            )
        })
    }

    /// Which events this attempt sends: those not delivered, and every later one of a key
    /// that has one not delivered (so a key's records keep their order).
    fn to_send(batch: &Batch<'_>) -> Vec<usize> {
        if batch.rejected.is_empty() && batch.delivered.iter().all(|d| !d) {
            // A first attempt: everything, without hashing a key per record.
            return (0..batch.events.len()).collect();
        }
        let mut behind: HashSet<Option<&str>> = HashSet::new();
        let rejected: HashSet<usize> = batch.rejected.iter().map(|r| r.index).collect();
        let mut send = Vec::new();
        for (i, event) in batch.events.iter().enumerate() {
            if rejected.contains(&i) {
                continue;
            }
            let key = encoder::key(event);
            if !batch.delivered[i] {
                behind.insert(key);
                send.push(i);
            } else if behind.contains(&key) {
                send.push(i);
            }
        }
        send
    }

    async fn attempt(&mut self, batch: &mut Batch<'_>) -> Result<(), SinkError> {
        let send = Self::to_send(batch);
        if send.is_empty() {
            return Ok(());
        }
        let ranges = encoder::values(batch.events, &mut self.buf);
        let topic = self.config.topic.clone();
        let tombstones = self.config.tombstones;
        let buf = std::mem::take(&mut self.buf);
        let producer = self.producer()?.clone();
        let mut outcome = Outcome::new(batch.events.len());
        let mut in_flight: std::collections::VecDeque<InFlight> =
            std::collections::VecDeque::with_capacity(send.len());
        for &i in &send {
            batch.delivered[i] = false;
            let event = &batch.events[i];
            let key = encoder::key(event);
            let tombstone = tombstones && encoder::is_delete(event);
            for part in 0..if tombstone { 2 } else { 1 } {
                let mut record: FutureRecord<'_, str, [u8]> =
                    FutureRecord::to(&topic).headers(encoder::headers(event));
                if part == 0 {
                    record = record.payload(&buf[ranges[i].clone()]);
                }
                if let Some(key) = key {
                    record = record.key(key);
                }
                loop {
                    match producer.send_result(record) {
                        Ok(future) => {
                            in_flight.push_back(InFlight { index: i, future });
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            // The producer's queue is full: wait for the oldest report.
                            match in_flight.pop_front() {
                                Some(f) => settle(f, &mut outcome).await,
                                None => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        }
                        Err((e, _)) => {
                            outcome.record(i, e);
                            break;
                        }
                    }
                }
            }
        }
        while let Some(f) = in_flight.pop_front() {
            settle(f, &mut outcome).await;
        }
        self.buf = buf;

        for &i in &send {
            batch.delivered[i] = !outcome.failed[i];
        }
        for r in &outcome.rejected {
            batch.delivered[r.index] = false;
        }
        for r in outcome.rejected {
            if !batch.rejected.iter().any(|b| b.index == r.index) {
                tracing::warn!(reason = %r.reason, "a record was refused for good: it goes to the dead letters");
                batch.rejected.push(r);
            }
        }
        if let Some((failure, error)) = outcome.worst {
            let fatal = self
                .producer
                .as_ref()
                .and_then(|p| p.client().fatal_error());
            let detail = match fatal {
                Some((code, reason)) => format!("{code}: {reason}"),
                None => error.to_string(),
            };
            // A new producer (new id and sequence numbers) for the retry.
            self.producer = None;
            return Err(match failure {
                Failure::Stop => self.error(
                    &format!("delivering to topic {:?}", self.config.topic),
                    detail,
                    false,
                    "grant the principal slotstream connects as the right to write to the cluster and the topic (IdempotentWrite, Write); nothing past the last checkpoint was acknowledged",
                ),
                _ => self.error(
                    &format!("delivering to topic {:?}", self.config.topic),
                    format!("the producer failed and is made again: {detail}"),
                    true,
                    "the batch is sent again with a new producer",
                ),
            });
        }
        if let Some(error) = outcome.first_error {
            // The retry gets a new producer: after a broker lost its state (a restart of a broker
            // without durable storage, an expired producer id) the old one's id is refused with
            // UNKNOWN_PRODUCER_ID until every record times out, again and again.
            self.producer = None;
            return Err(self.error(
                &format!("delivering to topic {:?}", self.config.topic),
                format!(
                    "{} of {} records not acknowledged: {error}",
                    outcome.failed_count,
                    send.len()
                ),
                true,
                "check that the brokers are up and reachable; the batch is retried, nothing past the last checkpoint was acknowledged",
            ));
        }
        Ok(())
    }

    async fn check_topic(&mut self) -> Result<String, SinkError> {
        let producer = self.producer()?.clone();
        let topic = self.config.topic.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
        })
        .await
        .map_err(|e| self.error("checking the topic", e.to_string(), true, "this is a bug: report it"))?
        .map_err(|e| {
            self.error(
                "connecting",
                e.to_string(),
                true,
                "check [destination] brokers, that the brokers are up and reachable from here, and [destination.security]",
            )
        })?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.config.topic)
            .map(|t| (t.error().map(RDKafkaErrorCode::from), t.partitions().len()));
        match found {
            Some((None, partitions)) if partitions > 0 => Ok(format!(
                "Kafka topic {:?} exists ({partitions} partitions) on {}",
                self.config.topic, self.config.brokers
            )),
            Some((Some(RDKafkaErrorCode::TopicAuthorizationFailed), _)) => Err(self.error(
                &format!("checking topic {:?}", self.config.topic),
                "not authorised to use the topic".into(),
                false,
                "grant the principal slotstream connects as Describe and Write on the topic",
            )),
            Some((Some(code), _))
                if code != RDKafkaErrorCode::UnknownTopicOrPartition
                    && code != RDKafkaErrorCode::UnknownTopic =>
            {
                Err(self.error(
                    &format!("checking topic {:?}", self.config.topic),
                    code.to_string(),
                    true,
                    "check the brokers' logs",
                ))
            }
            _ => self.create_topic().await,
        }
    }

    async fn create_topic(&mut self) -> Result<String, SinkError> {
        let topic = self.config.topic.clone();
        let Some(spec) = self.config.create_topic else {
            return Err(self.error(
                &format!("checking topic {topic:?}"),
                "the topic does not exist".into(),
                false,
                "create the topic, or set create_topic = true (with partitions and replication_factor) under [destination]",
            ));
        };
        let admin: AdminClient<DefaultClientContext> =
            self.config.client_config().create().map_err(|e| {
                self.error(
                    "admin client",
                    e.to_string(),
                    false,
                    "fix the [destination] keys",
                )
            })?;
        let new = NewTopic::new(
            &topic,
            spec.partitions,
            TopicReplication::Fixed(spec.replication_factor),
        );
        let options = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
        let results = admin.create_topics([&new], &options).await.map_err(|e| {
            self.error(
                &format!("creating topic {topic:?}"),
                e.to_string(),
                true,
                "check that the brokers are up and reachable",
            )
        })?;
        for result in results {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(self.error(
                        &format!("creating topic {topic:?}"),
                        code.to_string(),
                        false,
                        "create the topic yourself, or grant the principal Create on the cluster",
                    ));
                }
            }
        }
        tracing::info!(topic = %topic, partitions = spec.partitions, "created the Kafka topic");
        Ok(format!(
            "Kafka topic {topic:?} created ({} partitions) on {}",
            spec.partitions, self.config.brokers
        ))
    }
}

/// Waits for one record's delivery report and records its failure, if any.
async fn settle(f: InFlight, outcome: &mut Outcome) {
    match f.future.await {
        Ok(Ok(_)) => {}
        Ok(Err((error, _))) => outcome.record(f.index, error),
        Err(_) => outcome.record(
            f.index,
            KafkaError::MessageProduction(RDKafkaErrorCode::Fail),
        ),
    }
}

impl Sink for KafkaSink {
    fn deliver<'a>(&'a mut self, batch: &'a mut Batch<'_>) -> SinkFuture<'a, ()> {
        Box::pin(self.attempt(batch))
    }

    fn healthcheck(&mut self) -> SinkFuture<'_, String> {
        Box::pin(self.check_topic())
    }

    fn shutdown(&mut self) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            let Some(producer) = self.producer.clone() else {
                return Ok(());
            };
            tokio::task::spawn_blocking(move || producer.flush(FLUSH_TIMEOUT))
                .await
                .map_err(|e| {
                    self.error("flushing", e.to_string(), true, "this is a bug: report it")
                })?
                .map_err(|e| {
                    self.error(
                        "flushing",
                        e.to_string(),
                        true,
                        "records in flight at shutdown are sent again from the checkpoint",
                    )
                })
        })
    }

    fn describe(&self) -> String {
        format!("kafka:{}", self.config.topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Batch;

    #[test]
    fn a_retry_resends_the_failed_records_and_what_follows_them_per_key() {
        let mut events = crate::sink::test_events(&["a", "b", "a", "c", "b"]);
        let mut batch = Batch::new(&mut events);
        assert_eq!(KafkaSink::to_send(&batch), [0, 1, 2, 3, 4]);
        batch.delivered = vec![false, true, true, true, true];
        assert_eq!(KafkaSink::to_send(&batch), [0, 2]);
        batch.delivered = vec![true, false, true, true, true];
        batch.rejected.push(Rejected {
            index: 4,
            reason: "too large".into(),
        });
        assert_eq!(KafkaSink::to_send(&batch), [1]);
        batch.delivered = vec![true; 5];
        batch.rejected.clear();
        assert!(KafkaSink::to_send(&batch).is_empty());
    }
}
