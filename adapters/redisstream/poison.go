package redisstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline"
)

const (
	// listBatch is how many entries one XRANGE reads.
	listBatch = 500
	// claimTTL bounds how long an admin's claim on an entry outlives the
	// admin if it dies between claiming and deleting: one publish and one
	// XDEL take milliseconds.
	claimTTL = time.Minute
)

// PoisonStream lists, replays and purges the entries of a poison stream
// (pipeline.PoisonAdmin): it reads with XRANGE, decoding with the
// marshaler Watermill's publisher encodes with, and removes with XDEL.
//
// Replay and Purge claim each entry first (SET NX on a key of its own,
// expiring after claimTTL), check it is still there, act, then XDEL it:
// admins racing on an entry act on it once between them, and each count
// says what that admin did. An entry another admin claimed is skipped, not
// waited for.
type PoisonStream struct {
	rdb            goredis.UniversalClient
	pub            *redisstream.Publisher
	stream, target string
	// limit is the target's length limit; 0 for none.
	limit int64
	// token marks this admin's claims.
	token string
}

var _ pipeline.PoisonAdmin = (*PoisonStream)(nil)

// NewPoisonStream opens the poison stream of addr named stream, whose
// messages Replay re-publishes to target; limits are the streams' length
// limits, as the publishers bound them. Close it to close its client.
func NewPoisonStream(addr, stream, target string, limits map[string]int64, logger watermill.LoggerAdapter) (*PoisonStream, error) {
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
	return &PoisonStream{rdb: rdb, pub: pub, stream: stream, target: target, limit: limits[target], token: watermill.NewShortUUID()}, nil
}

// List returns the stream's entries, oldest first.
func (s *PoisonStream) List(ctx context.Context) ([]pipeline.Poisoned, error) {
	var out []pipeline.Poisoned
	err := s.each(ctx, func(p pipeline.Poisoned, _ string) error {
		out = append(out, p)
		return nil
	})
	return out, err
}

// Purge deletes the selected entries.
func (s *PoisonStream) Purge(ctx context.Context, sel pipeline.Selector) (int, error) {
	n := 0
	err := s.each(ctx, func(p pipeline.Poisoned, entry string) error {
		if !sel(p) {
			return nil
		}
		done, err := s.claimed(ctx, entry, func() error { return nil })
		if done {
			n++
		}
		return err
	})
	return n, err
}

// Replay publishes the selected messages to the target and deletes each
// entry once Redis stored the publish.
func (s *PoisonStream) Replay(ctx context.Context, sel pipeline.Selector) (int, error) {
	if s.limit > 0 {
		length, err := Trim(ctx, s.rdb, s.target)
		if err != nil {
			return 0, err
		}
		if length >= s.limit {
			return 0, fmt.Errorf("replay to %s: %w: it holds its limit of %d entries", s.target, ErrQueueFull, s.limit)
		}
	}
	n := 0
	var undecodable []string
	err := s.each(ctx, func(p pipeline.Poisoned, entry string) error {
		if !sel(p) {
			return nil
		}
		if p.Undecodable != "" {
			undecodable = append(undecodable, p.ID)
			return nil
		}
		done, err := s.claimed(ctx, entry, func() error {
			if err := s.pub.Publish(s.target, p.Replayable(ctx)); err != nil {
				return fmt.Errorf("replay %s to %s: %w", p.ID, s.target, err)
			}
			return nil
		})
		if done {
			n++
		}
		return err
	})
	if err != nil {
		return n, err
	}
	return n, pipeline.LeftUndecodable(undecodable)
}

// claimed claims entry, runs act if the entry is still there, and deletes
// it if act succeeded; done says act ran and the entry is gone. An entry
// another admin holds, or already removed, is left to it.
func (s *PoisonStream) claimed(ctx context.Context, entry string, act func() error) (done bool, err error) {
	key := fmt.Sprintf("imcloud:poison-claim:%s:%s", s.stream, entry)
	ok, err := s.rdb.SetNX(ctx, key, s.token, claimTTL).Result()
	if err != nil {
		return false, fmt.Errorf("claim %s of %s: %w", entry, s.stream, err)
	}
	if !ok {
		return false, nil
	}
	// Released once done; a deleted entry is not read again, so nothing
	// waits for the claim in between.
	defer s.rdb.Del(context.WithoutCancel(ctx), key)
	still, err := s.rdb.XRange(ctx, s.stream, entry, entry).Result()
	if err != nil {
		return false, fmt.Errorf("read %s of %s: %w", entry, s.stream, err)
	}
	if len(still) == 0 {
		return false, nil
	}
	if err := act(); err != nil {
		return false, err
	}
	if err := s.rdb.XDel(ctx, s.stream, entry).Err(); err != nil {
		return false, fmt.Errorf("delete %s of %s: %w", entry, s.stream, err)
	}
	return true, nil
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
	return pipeline.NewPoisoned(msg, at)
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
