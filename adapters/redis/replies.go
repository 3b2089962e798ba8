package redis

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline/idempotency"
)

// Replies keeps Idempotency-Key reservations and replies in Redis, so that
// a retry answered by another logic node gets the same reply and two
// nodes never run one key at once.
//
// A key's value is "P" + fingerprint + token while its request runs
// (expiring after idempotency.InFlightTTL), then "D" + fingerprint + reply
// for the TTL. The fingerprint is 64 hex digits.
type Replies struct {
	rdb    goredis.UniversalClient
	prefix string
	ttl    time.Duration
}

// NewReplies stores replies under prefix for ttl.
func NewReplies(rdb goredis.UniversalClient, prefix string, ttl time.Duration) *Replies {
	// v2: values carry a state and a fingerprint; a v1 value (a bare
	// reply) is never read as one. v3: the reply is the push's data, not
	// its envelope (logic wraps it in the shape of the API a retry came
	// by); a v2 envelope is never wrapped again. v4: an entry's key is a
	// digest of the idempotency key (redisKey).
	return &Replies{rdb: rdb, prefix: prefix + "v4:", ttl: ttl}
}

const fpLen = 64

// reserveScript sets the in-flight marker unless the key exists, and
// returns nothing when it did, or the value it found.
var reserveScript = goredis.NewScript(`
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])`)

// completeScript replaces this request's in-flight marker with its reply.
var completeScript = goredis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1`)

// releaseScript deletes this request's in-flight marker.
var releaseScript = goredis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])`)

// redisKey is where key's entry lives: a digest of it, not the key
// itself, which a caller chooses (the Idempotency-Key header): a key
// holding {tag} would otherwise pin every reply to one Redis Cluster slot
// of the caller's choosing, and a long one cost Redis its length in
// every command. 128 bits of SHA-256: no two keys meet by chance.
func (r *Replies) redisKey(key string) string {
	sum := sha256.Sum256([]byte(key))
	return r.prefix + hex.EncodeToString(sum[:16])
}

// Reserve claims key for a request with fingerprint fp.
func (r *Replies) Reserve(ctx context.Context, key, fp string) (idempotency.Entry, error) {
	if len(fp) != fpLen {
		return idempotency.Entry{}, fmt.Errorf("reserve idempotency key: fingerprint of %d characters, want %d", len(fp), fpLen)
	}
	token := uuid.NewString()
	v, err := reserveScript.Run(ctx, r.rdb, []string{r.redisKey(key)}, "P"+fp+token, idempotency.InFlightTTL.Milliseconds()).Text()
	if errors.Is(err, goredis.Nil) {
		return idempotency.Entry{State: idempotency.Reserved, Fingerprint: fp, Token: token}, nil
	}
	if err != nil {
		return idempotency.Entry{}, fmt.Errorf("redis reserve idempotency key: %w", err)
	}
	if len(v) < 1+fpLen {
		return idempotency.Entry{}, fmt.Errorf("redis reserve idempotency key: stored value of %d bytes is not an entry", len(v))
	}
	state, stored, rest := v[0], v[1:1+fpLen], v[1+fpLen:]
	switch state {
	case 'P':
		return idempotency.Entry{State: idempotency.InFlight, Fingerprint: stored}, nil
	case 'D':
		return idempotency.Entry{State: idempotency.Done, Fingerprint: stored, Reply: []byte(rest)}, nil
	}
	return idempotency.Entry{}, fmt.Errorf("redis reserve idempotency key: stored value in state %q", state)
}

// Complete stores reply for a key this request reserved.
func (r *Replies) Complete(ctx context.Context, key, token string, reply []byte) error {
	marker, err := r.marker(ctx, key, token)
	if err != nil || marker == "" {
		return err
	}
	var b strings.Builder
	b.Grow(1 + fpLen + len(reply))
	b.WriteByte('D')
	b.WriteString(marker[1 : 1+fpLen])
	b.Write(reply)
	if err := completeScript.Run(ctx, r.rdb, []string{r.redisKey(key)}, marker, b.String(), r.ttl.Milliseconds()).Err(); err != nil {
		return fmt.Errorf("redis store idempotent reply: %w", err)
	}
	return nil
}

// Release frees a key this request reserved.
func (r *Replies) Release(ctx context.Context, key, token string) error {
	marker, err := r.marker(ctx, key, token)
	if err != nil || marker == "" {
		return err
	}
	if err := releaseScript.Run(ctx, r.rdb, []string{r.redisKey(key)}, marker).Err(); err != nil {
		return fmt.Errorf("redis release idempotency key: %w", err)
	}
	return nil
}

// marker returns the in-flight value this request set, or "" when the key
// holds something else (the reservation lapsed).
func (r *Replies) marker(ctx context.Context, key, token string) (string, error) {
	v, err := r.rdb.Get(ctx, r.redisKey(key)).Result()
	if errors.Is(err, goredis.Nil) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("redis read idempotency key: %w", err)
	}
	if len(v) != 1+fpLen+len(token) || v[0] != 'P' || v[1+fpLen:] != token {
		return "", nil
	}
	return v, nil
}
