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
	// has no TTL. A stream with a TTL lives its TTL after its last Append;
	// one only read, ReadIdle. Once forgotten, its next use starts a new
	// epoch.
	Idle time.Duration
	// ReadIdle is how long a stream that a read (Tops, Since, Acked)
	// created, never appended to, lives: long enough that the epoch a
	// connection was given at connect is the one its first message keeps,
	// short enough that reads of made-up ids (GET /im/history, connect
	// Tops) cost nothing lasting. An Append gives it its full life.
	ReadIdle time.Duration
	// MaxStreams caps how many streams a store holding its state in its
	// own process (adapters/memory) keeps at once, and MaxTotalBytes what
	// they take in all (each stream's entries as counted for MaxBytes,
	// plus StreamOverhead and its name for the stream itself). Past
	// either, the least recently appended streams are forgotten whole: an
	// evicted stream's next use starts a new epoch, which tells its
	// clients their history is lost. A store in Redis leaves the total to
	// Redis's maxmemory.
	MaxStreams    int
	MaxTotalBytes int
}

// The caps a field ≤ 0 of HistoryCaps stands for: 10,000 entries, 4 MiB
// and a day per stream (the largest default limit, user streams, is
// 1,000 for 24 h).
const (
	DefaultHistoryMaxSize  = 10_000
	DefaultHistoryMaxBytes = 4 << 20
	DefaultHistoryIdle     = 24 * time.Hour
	// A minute: a connection's Tops and its first message are seconds
	// apart at most, and a million reads a minute of made-up streams
	// (~17k/s) keep at most a million alive.
	DefaultHistoryReadIdle = time.Minute
	// A million streams are a million users with messages within their
	// day (and their rooms) in one standalone process, far past what one
	// process's connections make: a cap near the live set would evict
	// live users' history. Measured ~200 bytes a stream of state (counted
	// as StreamOverhead, 300): a million are ~200 MB.
	DefaultHistoryMaxStreams = 1_000_000
	// 512 MiB holds a million streams' state and ~750k kept pushes of 200
	// bytes besides (290 counted each, with a ULID id), or 128 users' full
	// 4 MiB history; it leaves room on a 1 GiB machine for the rest of
	// the process. Without it a backend pushing to one-off mids grows the
	// heap until the process dies (~2.6 billion streams a day at 30
	// requests/s of 1,000 new mids).
	DefaultHistoryMaxTotalBytes = 512 << 20
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
	if c.ReadIdle <= 0 {
		c.ReadIdle = DefaultHistoryReadIdle
	}
	c.ReadIdle = min(c.ReadIdle, c.Idle)
	if c.MaxStreams <= 0 {
		c.MaxStreams = DefaultHistoryMaxStreams
	}
	if c.MaxTotalBytes <= 0 {
		c.MaxTotalBytes = DefaultHistoryMaxTotalBytes
	}
	// One stream's full history fits the total, so evicting the others
	// always brings the total back under it.
	c.MaxBytes = min(c.MaxBytes, c.MaxTotalBytes/2)
	return c
}

// EntryOverhead is what every kept entry counts toward MaxBytes beside
// its body and id, so that a flood of empty bodies is bounded too.
const EntryOverhead = 64

// StreamOverhead is what every stream counts toward MaxTotalBytes beside
// its name and entries: its state, map slot and links as measured on the
// heap (adapters/memory TestHistoryStreamOverhead: 194 bytes a stream
// named "user:<7 digits>" on amd64, the map's growth included), with
// room for a map caught mid-growth.
const StreamOverhead = 300
