package redisstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline"
)

const (
	// listBatch is how many entries one XRANGE of Replay or Purge reads.
	listBatch = 500
	// settleTimeout bounds the one script that replays an entry once the
	// caller's context is done: the script is atomic on the server, and
	// waiting for its answer is how the count stays true. One XADD and one
	// XDEL take well under a millisecond on the local Redis.
	settleTimeout = 10 * time.Second
)

// replayScript moves one entry from the poison stream (KEYS[1]) to the
// target (KEYS[2]) atomically: an entry already gone answers 0, a target
// holding its limit (ARGV[2], 0 for none) answers -1, else the entry
// (ARGV[1]) is added to the target with the fields ARGV[3..] and deleted
// from the poison stream, answering 1. Being one script, a cancel or a
// crash never leaves the entry both replayed and still poisoned, and two
// admins racing on it replay it once between them.
var replayScript = goredis.NewScript(`
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('XLEN', KEYS[2]) >= limit then return -1 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
`)

// PoisonStream lists, replays and purges the entries of a poison stream
// (pipeline.PoisonAdmin): it reads with XRANGE, decoding with the
// marshaler Watermill's publisher encodes with. An entry's key is its
// stream entry id, which Redis assigns.
//
// Purge is XDEL, which says whether it deleted. Replay runs replayScript
// per entry: the length check, the XADD to the target and the XDEL are
// one atomic step, so admins racing on an entry act on it once between
// them, each count says what that admin did, and the length limit of the
// target each entry goes to (pipeline.ReplayTargets.For) holds for it.
type PoisonStream struct {
	rdb     goredis.UniversalClient
	pub     *redisstream.Publisher
	stream  string
	targets pipeline.ReplayTargets
	// limits are the targets' length limits; 0 (or absent) for none.
	limits map[string]int64
}

var _ pipeline.PoisonAdmin = (*PoisonStream)(nil)

// NewPoisonStream opens the poison stream of addr named stream, whose
// messages Replay re-publishes to targets (pipeline.ReplayTargets.For
// picks one per message); limits are the streams' length limits, as the
// publishers bound them. Close it to close its client.
func NewPoisonStream(addr, stream string, targets pipeline.ReplayTargets, limits map[string]int64, logger watermill.LoggerAdapter) (*PoisonStream, error) {
	if err := targets.Check(); err != nil {
		return nil, fmt.Errorf("poison stream %s: %w", stream, err)
	}
	// Only the targets' limits: the map is the caller's, and no other
	// stream is written to.
	own := make(map[string]int64, len(targets))
	for _, t := range targets {
		own[t] = limits[t]
	}
	rdb := NewClient(addr)
	if err := rdb.Ping(context.Background()).Err(); err != nil {
		_ = rdb.Close()
		return nil, fmt.Errorf("redis %s: %w", addr, err)
	}
	pub, err := NewPublisher(rdb, logger)
	if err != nil {
		_ = rdb.Close()
		return nil, err
	}
	return &PoisonStream{rdb: rdb, pub: pub, stream: stream, targets: slices.Clone(targets), limits: own}, nil
}

// List returns up to limit entries after the entry id after, oldest first.
func (s *PoisonStream) List(ctx context.Context, after string, limit int) ([]pipeline.Poisoned, bool, error) {
	limit = max(limit, 1)
	start := "-"
	if after != "" {
		if !isEntryID(after) {
			return nil, false, fmt.Errorf("list %s after %q: %w (a stream entry id)", s.stream, after, pipeline.ErrBadKey)
		}
		start = "(" + after
	}
	entries, err := s.rdb.XRangeN(ctx, s.stream, start, "+", int64(limit)+1).Result()
	if err != nil {
		return nil, false, fmt.Errorf("read %s: %w", s.stream, err)
	}
	more := len(entries) > limit
	entries = entries[:min(limit, len(entries))]
	out := make([]pipeline.Poisoned, 0, len(entries))
	for _, e := range entries {
		out = append(out, decode(e))
	}
	return out, more, nil
}

// Purge deletes the selected entries; one another admin deleted first is
// not counted.
func (s *PoisonStream) Purge(ctx context.Context, sel pipeline.Selector) (int, error) {
	n := 0
	err := s.each(ctx, func(p pipeline.Poisoned, entry string) error {
		if !sel(p) {
			return nil
		}
		deleted, err := s.rdb.XDel(ctx, s.stream, entry).Result()
		if err != nil {
			return fmt.Errorf("delete %s of %s: %w", entry, s.stream, err)
		}
		n += int(deleted)
		return nil
	})
	return n, err
}

// Replay moves the selected messages, each to its target, each in one
// atomic step (replayScript). It stops at the first that does not fit its
// target's limit, with pipeline.ErrQueueFull.
func (s *PoisonStream) Replay(ctx context.Context, sel pipeline.Selector) (pipeline.Replayed, error) {
	done := pipeline.Replayed{}
	var undecodable []string
	err := s.each(ctx, func(p pipeline.Poisoned, entry string) error {
		if !sel(p) {
			return nil
		}
		if p.Undecodable != "" {
			undecodable = append(undecodable, p.Key)
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		to := s.targets.For(p)
		moved, err := s.move(ctx, p, entry, to)
		if moved {
			done[to]++
		}
		return err
	})
	if err != nil {
		return done, err
	}
	return done, pipeline.LeftUndecodable(undecodable)
}

// move runs replayScript on entry, to the stream target with target's
// limit; moved says this call replayed it. A full target is trimmed of
// what its consumers are done with (Trim) and tried once more before the
// move is refused.
func (s *PoisonStream) move(ctx context.Context, p pipeline.Poisoned, entry, target string) (moved bool, err error) {
	fields, err := redisstream.DefaultMarshallerUnmarshaller{}.Marshal(target, p.Replayable(ctx))
	if err != nil {
		return false, fmt.Errorf("replay %s: encode: %w", p.Key, err)
	}
	limit := s.limits[target]
	args := []any{entry, limit}
	for k, v := range fields {
		args = append(args, k, v)
	}
	for attempt := 0; ; attempt++ {
		// Not the caller's context: a cancel must not lose the answer
		// of a script that ran, or the count would say less than was
		// replayed.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
		res, err := replayScript.Run(sctx, s.rdb, []string{s.stream, target}, args...).Int()
		cancel()
		if err != nil {
			return false, fmt.Errorf("replay %s to %s: %w", p.Key, target, err)
		}
		switch {
		case res == 1:
			return true, nil
		case res == 0:
			return false, nil
		case attempt > 0:
			return false, fmt.Errorf("replay %s to %s: %w: it holds its limit of %d entries", p.Key, target, ErrQueueFull, limit)
		}
		if _, err := Trim(ctx, s.rdb, target); err != nil {
			return false, fmt.Errorf("replay %s: %w", p.Key, err)
		}
	}
}

// each reads the stream's entries as it is when called, oldest first, in
// batches, and calls fn with each and its entry id.
func (s *PoisonStream) each(ctx context.Context, fn func(p pipeline.Poisoned, entry string) error) error {
	last, err := s.rdb.XRevRangeN(ctx, s.stream, "+", "-", 1).Result()
	if err != nil {
		return fmt.Errorf("read %s: %w", s.stream, err)
	}
	if len(last) == 0 {
		return nil
	}
	end, start := last[0].ID, "-"
	for {
		entries, err := s.rdb.XRangeN(ctx, s.stream, start, end, listBatch).Result()
		if err != nil {
			return fmt.Errorf("read %s: %w", s.stream, err)
		}
		for _, e := range entries {
			if err := fn(decode(e), e.ID); err != nil {
				return err
			}
		}
		if len(entries) < listBatch {
			return nil
		}
		start = "(" + entries[len(entries)-1].ID
	}
}

// decode reads an entry as Watermill's publisher wrote it; an entry it
// cannot read is described as undecodable, its fields as JSON.
func decode(e goredis.XMessage) (p pipeline.Poisoned) {
	ms, _ := splitID(e.ID)
	at := time.UnixMilli(int64(ms))
	defer func() {
		// The unmarshaler asserts the fields' types; go-redis gives
		// strings, but a panic here would lose the whole listing.
		if r := recover(); r != nil {
			p = undecodable(e, at, fmt.Errorf("decode: %v", r))
		}
	}()
	msg, err := redisstream.DefaultMarshallerUnmarshaller{}.Unmarshal(e.Values)
	if err != nil {
		return undecodable(e, at, err)
	}
	return pipeline.NewPoisoned(e.ID, msg, at)
}

func undecodable(e goredis.XMessage, at time.Time, err error) pipeline.Poisoned {
	raw, jerr := json.Marshal(e.Values)
	if jerr != nil {
		raw = fmt.Appendf(nil, "%v", e.Values)
	}
	return pipeline.NewUndecodable(e.ID, raw, at, fmt.Errorf("redis stream entry %s: %w", e.ID, err))
}

// Close closes the client.
func (s *PoisonStream) Close() error {
	if err := s.pub.Close(); err != nil && !errors.Is(err, goredis.ErrClosed) {
		return fmt.Errorf("close redis client: %w", err)
	}
	return nil
}

// isEntryID says id is a stream entry id, digits-digits: anything else
// would change the meaning of the XRANGE bound it is put in.
func isEntryID(id string) bool {
	ms, seq, ok := strings.Cut(id, "-")
	digits := func(s string) bool {
		return s != "" && strings.Trim(s, "0123456789") == ""
	}
	return ok && digits(ms) && digits(seq)
}

// Depth is the poison stream's length.
func (s *PoisonStream) Depth(ctx context.Context) (int64, error) {
	n, err := s.rdb.XLen(ctx, s.stream).Result()
	if err != nil {
		return 0, fmt.Errorf("length of %s: %w", s.stream, err)
	}
	return n, nil
}
