//! Script calls sent to Redis in the order they were made.
//!
//! The Redis connection manager multiplexes concurrent commands, but when
//! several callers wait for its connection (at start-up, after a reconnect)
//! they resume, and send, in no particular order. A session's burst of
//! publications is handled side by side (see `Router::handle_run`) and must
//! still be numbered in the order sent, so publications do not call Redis
//! directly: each is queued at once, in its caller's first poll, and one
//! task sends whatever is queued as one pipeline, in queue order. A burst
//! then also costs one round trip, whoever it comes from.

use redis::{aio::ConnectionManager, Cmd, FromRedisValue, RedisError, ToRedisArgs, Value};
use tokio::sync::{mpsc, oneshot};

/// Most calls sent in one pipeline.
const MAX_PIPELINE: usize = 256;
/// Most calls waiting in line; past it a call is refused at once (a Redis
/// that stopped answering must not make publications pile up in memory).
const MAX_WAITING: usize = 65_536;

/// A call of one script with its keys and arguments, built like
/// `redis::ScriptInvocation` but sent as a plain `EVALSHA` command.
pub(super) struct ScriptCall {
    hash: String,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl ScriptCall {
    pub(super) fn new(script: &redis::Script) -> ScriptCall {
        ScriptCall {
            hash: script.get_hash().to_owned(),
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut ScriptCall {
        self.keys.extend(key.to_redis_args());
        self
    }

    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut ScriptCall {
        self.args.extend(arg.to_redis_args());
        self
    }

    fn command(&self) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.hash)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}

/// A call waiting for its turn, and who waits for its answer.
struct Queued {
    call: ScriptCall,
    answer: oneshot::Sender<Result<Value, RedisError>>,
}

/// The sending end: cheap to use from any task.
pub(super) struct OrderedCalls {
    queue: mpsc::Sender<Queued>,
    /// What the sending task needs, until [`OrderedCalls::start`].
    unstarted: std::sync::Mutex<Option<SendLoop>>,
}

struct SendLoop {
    connection: ConnectionManager,
    script: redis::Script,
    calls: mpsc::Receiver<Queued>,
}

impl OrderedCalls {
    /// Calls of `script` over `connection`; they wait in line until
    /// [`OrderedCalls::start`].
    pub(super) fn new(connection: ConnectionManager, script: redis::Script) -> OrderedCalls {
        let (queue, calls) = mpsc::channel(MAX_WAITING);
        OrderedCalls {
            queue,
            unstarted: std::sync::Mutex::new(Some(SendLoop {
                connection,
                script,
                calls,
            })),
        }
    }

    /// Starts the task that sends the calls (once; later calls do
    /// nothing). It ends when this value is dropped.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub(super) fn start(&self) {
        let unstarted = self
            .unstarted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = unstarted {
            tokio::spawn(send_loop(task.connection, task.script, task.calls));
        }
    }

    /// Queues `call` now (its place in line is taken before this returns)
    /// and returns its answer once Redis gives it.
    pub(super) fn call<T: FromRedisValue>(
        &self,
        call: ScriptCall,
    ) -> impl std::future::Future<Output = Result<T, RedisError>> + Send + 'static {
        let (answer, answered) = oneshot::channel();
        let queued = self.queue.try_send(Queued { call, answer });
        async move {
            match queued {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "too many publications waiting for Redis",
                    )))
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(gone()),
            }
            let value = answered.await.map_err(|_| gone())??;
            T::from_redis_value(value).map_err(RedisError::from)
        }
    }
}

fn gone() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the Redis publishing task has stopped",
    ))
}

/// Sends what is queued, as one pipeline at a time, in queue order.
async fn send_loop(
    mut connection: ConnectionManager,
    script: redis::Script,
    mut calls: mpsc::Receiver<Queued>,
) {
    let mut batch = Vec::with_capacity(MAX_PIPELINE);
    while calls.recv_many(&mut batch, MAX_PIPELINE).await > 0 {
        // Whoever gave up waiting is not asked again (they were told the
        // publication failed).
        batch.retain(|queued: &Queued| !queued.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        let answers = match send(&mut connection, &batch).await {
            Ok(values) => values.into_iter().map(Ok).collect(),
            Err(err) => vec![Err(err); batch.len()],
        };
        let answers = retry_noscript(&mut connection, &script, &batch, answers).await;
        for (queued, answer) in batch.drain(..).zip(answers) {
            let answer = answer.and_then(|value| match value {
                Value::ServerError(err) => Err(RedisError::from(err)),
                value => Ok(value),
            });
            let _ = queued.answer.send(answer);
        }
    }
}

/// `answers` with the calls Redis refused for not knowing the script
/// (after a restart it has none) sent again once it is loaded. Only those
/// are sent again: the others ran (or failed) already. A refused call
/// followed by one that ran (another node loaded the script meanwhile)
/// cannot be sent again without being numbered after it, so it fails
/// instead (the publisher is told, and may retry).
async fn retry_noscript(
    connection: &mut ConnectionManager,
    script: &redis::Script,
    batch: &[Queued],
    mut answers: Vec<Result<Value, RedisError>>,
) -> Vec<Result<Value, RedisError>> {
    let refused =
        |answer: &Result<Value, RedisError>| matches!(answer, Ok(value) if is_noscript(value));
    let Some(first) = answers.iter().position(refused) else {
        return answers;
    };
    let last_ran = answers.iter().rposition(|a| !refused(a));
    for answer in &mut answers[first..last_ran.map_or(first, |i| i.max(first))] {
        if refused(answer) {
            *answer = Err(RedisError::from(std::io::Error::other(
                "Redis lost its scripts in the middle of a pipeline",
            )));
        }
    }
    let refused: Vec<usize> = (0..answers.len())
        .filter(|&i| refused(&answers[i]))
        .collect();
    if refused.is_empty() {
        return answers;
    }
    let again: Vec<&Queued> = refused.iter().map(|&i| &batch[i]).collect();
    let retried = match script.load_async(connection).await {
        Ok(_) => send(connection, &again).await,
        Err(err) => Err(err),
    };
    match retried {
        Ok(values) => {
            for (i, value) in refused.into_iter().zip(values) {
                answers[i] = Ok(value);
            }
        }
        Err(err) => {
            for i in refused {
                answers[i] = Err(err.clone());
            }
        }
    }
    answers
}

/// One pipeline of every call in `batch`, each call's answer (or its
/// error) in its place.
async fn send<Q: std::borrow::Borrow<Queued>>(
    connection: &mut ConnectionManager,
    batch: &[Q],
) -> Result<Vec<Value>, RedisError> {
    let mut pipeline = redis::pipe();
    pipeline.ignore_errors();
    for queued in batch {
        pipeline.add_command(queued.borrow().call.command());
    }
    pipeline.query_async(connection).await
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(err) if err.code() == "NOSCRIPT")
}
