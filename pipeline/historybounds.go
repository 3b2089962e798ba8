package pipeline

import (
	"errors"
	"fmt"
	"time"
)

// Bounds every History keeps to, whatever its callers ask: each call's
// cost is bounded before it reaches the store.
const (
	// MaxHistoryStreams is the most streams one Append or Tops takes; a
	// caller with more (a push to many users) batches them. 1,000 keeps
	// one Redis script under ~1 ms.
	MaxHistoryStreams = 1000
	// MaxHistorySince is the most entries one Since returns; a larger (or
	// non-positive) max is cut to it.
	MaxHistorySince = 1000
	// MaxStreamLen bounds a stream's name: "room:" and a room of
	// wire.MaxRoomLen (128) bytes; a user stream is far shorter.
	MaxStreamLen = len("room:") + 128
)

// ErrHistoryRequest is a History call out of its bounds: too many streams,
// or an empty or too long stream name. Nothing of the call was done.
var ErrHistoryRequest = errors.New("history request out of bounds")

// CheckHistoryStreams checks streams against the bounds above; every
// History calls it before touching its state.
func CheckHistoryStreams(streams []string) error {
	if len(streams) > MaxHistoryStreams {
		return fmt.Errorf("%w: %d streams in one call, at most %d", ErrHistoryRequest, len(streams), MaxHistoryStreams)
	}
	for _, s := range streams {
		if err := CheckStream(s); err != nil {
			return err
		}
	}
	return nil
}

// CheckHistoryPositions checks the positions of one Void: at most
// MaxHistoryStreams, each of a stream CheckStream accepts.
func CheckHistoryPositions(positions []StreamPos) error {
	if len(positions) > MaxHistoryStreams {
		return fmt.Errorf("%w: %d positions in one call, at most %d", ErrHistoryRequest, len(positions), MaxHistoryStreams)
	}
	for _, p := range positions {
		if err := CheckStream(p.Stream); err != nil {
			return err
		}
	}
	return nil
}

// EntryKeysSize is what an entry's keys count toward MaxBytes.
func EntryKeysSize(keys []string) int {
	n := 0
	for _, k := range keys {
		n += len(k) + 1
	}
	return n
}

// CheckStream checks one stream name against MaxStreamLen.
func CheckStream(s string) error {
	if s == "" || len(s) > MaxStreamLen {
		return fmt.Errorf("%w: stream name of %d bytes, want 1 to %d", ErrHistoryRequest, len(s), MaxStreamLen)
	}
	return nil
}

// HistoryCaps are a History store's hard caps: whatever limit(stream)
// asks, a stream keeps at most MaxSize entries and MaxBytes of them, so
// one stream cannot eat the store.
type HistoryCaps struct {
	// MaxSize caps StreamLimit.Size.
	MaxSize int
	// MaxBytes caps the bytes a stream's entries take (body, id and a
	// fixed overhead each). An entry larger than it gets its position but
	// is not kept (nor, so the history has no hole, any before it).
	MaxBytes int
	// Idle is how long a stream untouched by Append lives when its limit
	// has no TTL, or it was only read (Tops, Since, Acked) and never
	// appended to. A stream with a TTL lives its TTL after its last Append.
	// Once forgotten, its next use starts a new epoch.
	Idle time.Duration
}

// The caps a field ≤ 0 of HistoryCaps stands for: 10,000 entries, 4 MiB
// and a day per stream (the largest default limit, user streams, is
// 1,000 for 24 h).
const (
	DefaultHistoryMaxSize  = 10_000
	DefaultHistoryMaxBytes = 4 << 20
	DefaultHistoryIdle     = 24 * time.Hour
)

// Normalized returns c with any field ≤ 0 set to its default.
func (c HistoryCaps) Normalized() HistoryCaps {
	if c.MaxSize <= 0 {
		c.MaxSize = DefaultHistoryMaxSize
	}
	if c.MaxBytes <= 0 {
		c.MaxBytes = DefaultHistoryMaxBytes
	}
	if c.Idle <= 0 {
		c.Idle = DefaultHistoryIdle
	}
	return c
}

// EntryOverhead is what every kept entry counts toward MaxBytes beside
// its body and id, so that a flood of empty bodies is bounded too.
const EntryOverhead = 64
