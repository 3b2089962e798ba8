package redis

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline"
)

// Agreements keeps, per setting, which live process runs with which
// value (pipeline.Agreements): one sorted set a setting, under a prefix,
//
//	agree:{name}   member "<value>\x00<process>", score the ms it lapses at
//
// One key a setting, so that one script reads and writes it atomically on
// a Redis Cluster too.
type Agreements struct {
	rdb    goredis.UniversalClient
	prefix string
}

// NewAgreements returns the agreements kept in rdb under prefix.
func NewAgreements(rdb goredis.UniversalClient, prefix string) *Agreements {
	return &Agreements{rdb: rdb, prefix: prefix}
}

func (a *Agreements) key(name string) string { return a.prefix + "agree:{" + name + "}" }

// agreeScript drops lapsed members, returns the first live one of another
// value (and records nothing) when ARGV[4] is "1" (Agree; "0": Announce,
// no check), or records ARGV[2] for ARGV[3] until ARGV[1] ms from now. Redis's clock, not the callers', decides what
// lapsed: processes on several hosts need not agree on the time.
var agreeScript = goredis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local mine = ARGV[2] .. '\0' .. ARGV[3]
-- A member's own entries of another value (it cannot change its value
-- today: values are read at start) are replaced, not kept beside.
local own = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local sep = string.find(m, '\0', 1, true)
  if sep then
    if string.sub(m, sep + 1) == ARGV[3] then
      if m ~= mine then own[#own + 1] = m end
    elseif ARGV[4] == '1' and string.sub(m, 1, sep - 1) ~= ARGV[2] then
      return m
    end
  end
end
for _, m in ipairs(own) do redis.call('ZREM', KEYS[1], m) end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), mine)
-- The set lives as long as its longest-lived member, whatever ttl this
-- one renews with.
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], top[2])
return false`)

// Agree records that member runs with name = value for ttl, unless a live
// member runs with another value: that one is returned, and nothing is
// recorded.
func (a *Agreements) Agree(ctx context.Context, name, value, member string, ttl time.Duration) (pipeline.Agreed, error) {
	if strings.ContainsRune(value, 0) || strings.ContainsRune(member, 0) {
		return pipeline.Agreed{}, fmt.Errorf("agree on %s: value and member must not hold NUL", name)
	}
	res, err := agreeScript.Run(ctx, a.rdb, []string{a.key(name)}, max(ttl.Milliseconds(), 1), value, member, "1").Text()
	if errors.Is(err, goredis.Nil) {
		return pipeline.Agreed{}, nil
	}
	if err != nil {
		return pipeline.Agreed{}, fmt.Errorf("redis agree on %s: %w", name, err)
	}
	v, m, _ := strings.Cut(res, "\x00")
	return pipeline.Agreed{Value: v, Member: m}, nil
}

// Leave removes member's record of name: a process stopping cleanly lets
// the cluster change the setting at once, not after its ttl.
func (a *Agreements) Leave(ctx context.Context, name, member string) error {
	if err := leaveScript.Run(ctx, a.rdb, []string{a.key(name)}, member).Err(); err != nil && !errors.Is(err, goredis.Nil) {
		return fmt.Errorf("redis leave %s: %w", name, err)
	}
	return nil
}

var leaveScript = goredis.NewScript(`
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local sep = string.find(m, '\0', 1, true)
  if sep and string.sub(m, sep + 1) == ARGV[1] then redis.call('ZREM', KEYS[1], m) end
end
return 0`)

// Announce records that member runs with name = value for ttl, whatever
// the others run with: what each process says of itself where the
// processes need not agree (job.shards).
func (a *Agreements) Announce(ctx context.Context, name, value, member string, ttl time.Duration) error {
	if strings.ContainsRune(value, 0) || strings.ContainsRune(member, 0) {
		return fmt.Errorf("announce %s: value and member must not hold NUL", name)
	}
	if err := agreeScript.Run(ctx, a.rdb, []string{a.key(name)}, max(ttl.Milliseconds(), 1), value, member, "0").Err(); err != nil && !errors.Is(err, goredis.Nil) {
		return fmt.Errorf("redis announce %s: %w", name, err)
	}
	return nil
}

// liveScript returns the members not lapsed, by Redis's clock.
var liveScript = goredis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')`)

// Live returns every live member's value of name.
func (a *Agreements) Live(ctx context.Context, name string) ([]pipeline.Agreed, error) {
	ms, err := liveScript.Run(ctx, a.rdb, []string{a.key(name)}).StringSlice()
	if err != nil && !errors.Is(err, goredis.Nil) {
		return nil, fmt.Errorf("redis read %s: %w", name, err)
	}
	out := make([]pipeline.Agreed, 0, len(ms))
	for _, m := range ms {
		v, member, ok := strings.Cut(m, "\x00")
		if ok {
			out = append(out, pipeline.Agreed{Value: v, Member: member})
		}
	}
	return out, nil
}
