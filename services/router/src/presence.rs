//! Presence in Redis.
//!
//! Each user has a sorted set `<ns>:sessions:<user>` of live session ids scored by the time
//! they expire; a user is online while it holds an unexpired member. Gateways refresh their
//! sessions by heartbeat, so a crashed gateway's sessions simply expire. A second sorted set,
//! `<ns>:expiry`, indexes every session by expiry so that a sweep (run by any router, each
//! entry claimed atomically by one) can announce users who went offline by expiry.
//! Every change runs as one Lua script, so two routers never both announce one transition.
//! A set `<ns>:online` holds the users online now, for the `chat_online_users` gauge.

use std::num::NonZeroUsize;
use std::time::Duration;

use chat_proto::UserId;
use chat_proto::envelope::Session;
use chat_runtime::ops;
use redis::aio::ConnectionManager;

/// Refreshes sessions. ARGV: prefix, now, expires_at, keep_ms, then user/session pairs.
/// Returns the users who had no live session before: they just came online.
const TOUCH: &str = r"
local prefix, now, expires, keep = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local came = {}
for i = 5, #ARGV, 2 do
  local user, session = ARGV[i], ARGV[i + 1]
  local key = prefix .. 'sessions:' .. user
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) == 0 then table.insert(came, user) end
  redis.call('SADD', prefix .. 'online', user)
  redis.call('ZADD', key, expires, session)
  redis.call('PEXPIRE', key, keep)
  redis.call('ZADD', prefix .. 'expiry', expires, user .. '|' .. session)
end
return came
";

/// Removes one session. ARGV: prefix, now, user, session. Returns 1 when this removal left
/// the user with no live session: they just went offline.
const DROP: &str = r"
local prefix, now, user, session = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local key = prefix .. 'sessions:' .. user
local removed = redis.call('ZREM', key, session)
redis.call('ZREM', prefix .. 'expiry', user .. '|' .. session)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if removed == 1 and redis.call('ZCARD', key) == 0 then
  redis.call('SREM', prefix .. 'online', user)
  return 1
end
return 0
";

/// Claims expired sessions. ARGV: prefix, now, max. Returns the users whom the expiry left
/// with no live session.
const SWEEP: &str = r"
local prefix, now, max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local index = prefix .. 'expiry'
local due = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, max)
local gone = {}
for _, entry in ipairs(due) do
  redis.call('ZREM', index, entry)
  local sep = string.find(entry, '|', 1, true)
  local user = string.sub(entry, 1, sep - 1)
  local key = prefix .. 'sessions:' .. user
  local removed = redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if removed > 0 and redis.call('ZCARD', key) == 0 then
    redis.call('SREM', prefix .. 'online', user)
    table.insert(gone, user)
  end
end
return gone
";

/// The histogram of Redis call latency.
const REDIS: &str = "chat_redis_seconds";

/// Sessions per script call, so one heartbeat of a large gateway does not block Redis.
const CHUNK: usize = 500;

/// Session counts are cached in the router (Redis's server-assisted client-side caching over
/// RESP3): Redis tracks which keys this connection read and pushes an invalidation on it when
/// one changes, whoever changed it; a reconnection empties the cache.
/// This takes the Redis round trip off the live path of most messages. Only the counts'
/// lookups opt in.
pub(crate) fn cache_config() -> redis::caching::CacheConfig {
    redis::caching::CacheConfig::new()
        .set_mode(redis::caching::CacheMode::OptIn)
        .set_size(CACHE_SIZE)
        .set_default_client_ttl(CACHE_TTL)
}

/// Users whose session counts the cache holds at most (least recently used go first).
const CACHE_SIZE: NonZeroUsize = NonZeroUsize::new(100_000).expect("not zero");
/// How long a cached count is used at most, invalidated or not: a bound on any staleness the
/// invalidations miss.
const CACHE_TTL: Duration = Duration::from_secs(60);

/// Presence operations over one multiplexed Redis connection.
#[derive(Clone)]
pub(crate) struct Presence {
    redis: ConnectionManager,
    prefix: String,
    ttl: Duration,
    touch: redis::Script,
    drop: redis::Script,
    sweep: redis::Script,
}

impl Presence {
    /// Whether Redis answers (the readiness probe).
    pub(crate) async fn ping(&self) -> redis::RedisResult<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.redis.clone())
            .await
    }

    pub(crate) fn new(redis: ConnectionManager, prefix: String, ttl: Duration) -> Self {
        Presence {
            redis,
            prefix,
            ttl,
            touch: redis::Script::new(TOUCH),
            drop: redis::Script::new(DROP),
            sweep: redis::Script::new(SWEEP),
        }
    }

    /// Marks sessions live for another TTL; returns who came online.
    pub(crate) async fn touch(&self, sessions: &[Session]) -> redis::RedisResult<Vec<UserId>> {
        let now = chat_proto::now_ms();
        let expires = now + self.ttl.as_millis() as i64;
        let keep = self.ttl.as_millis() as i64 * 10;
        let mut came = Vec::new();
        for chunk in sessions.chunks(CHUNK) {
            let mut call = self.touch.prepare_invoke();
            call.arg(&self.prefix).arg(now).arg(expires).arg(keep);
            for s in chunk {
                call.arg(s.user_id).arg(&s.session_id);
            }
            let users: Vec<UserId> =
                ops::timed(REDIS, "touch", call.invoke_async(&mut self.redis.clone())).await?;
            came.extend(users);
        }
        Ok(came)
    }

    /// Ends a session; true when the user has no other.
    pub(crate) async fn drop_session(&self, s: &Session) -> redis::RedisResult<bool> {
        let mut call = self.drop.prepare_invoke();
        call.arg(&self.prefix)
            .arg(chat_proto::now_ms())
            .arg(s.user_id)
            .arg(&s.session_id);
        let gone: i64 =
            ops::timed(REDIS, "drop", call.invoke_async(&mut self.redis.clone())).await?;
        Ok(gone == 1)
    }

    /// Claims up to `max` expired sessions; returns who went offline.
    pub(crate) async fn sweep(&self, max: usize) -> redis::RedisResult<Vec<UserId>> {
        let mut call = self.sweep.prepare_invoke();
        call.arg(&self.prefix).arg(chat_proto::now_ms()).arg(max);
        ops::timed(REDIS, "sweep", call.invoke_async(&mut self.redis.clone())).await
    }

    /// Users online and live sessions, across every gateway.
    pub(crate) async fn counts(&self) -> redis::RedisResult<(u64, u64)> {
        let mut pipe = redis::pipe();
        pipe.scard(format!("{}online", self.prefix))
            .zcard(format!("{}expiry", self.prefix));
        ops::timed(REDIS, "counts", pipe.query_async(&mut self.redis.clone())).await
    }

    /// How many sessions each user has, in one pipelined round trip for those not cached (see
    /// [`cache_config`]). A session past its expiry counts until the sweep or the user's next
    /// heartbeat removes it (within a second): the answer must not depend on the time to be
    /// cached, and an extra count only costs a push no device receives.
    pub(crate) async fn sessions(&self, users: &[UserId]) -> redis::RedisResult<Vec<i64>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let cached = redis::CommandCacheConfig::new().set_enable_cache(true);
        let mut pipe = redis::pipe();
        for u in users {
            pipe.zcard(format!("{}sessions:{u}", self.prefix))
                .set_cache_config(cached.clone());
        }
        ops::timed(REDIS, "sessions", pipe.query_async(&mut self.redis.clone())).await
    }
}
