package pipeline

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"time"
)

// Streams. Every room and every user is a stream of messages, each with a
// position that rises in the order logic accepted them. A stream's epoch
// changes when its history is lost, so a position is only ever compared
// with one of the same epoch.

// RoomStream is the stream of a room's messages.
func RoomStream(room string) string { return "room:" + room }

// UserStream is the stream of a user's messages (mid and key pushes).
func UserStream(mid int64) string { return "user:" + strconv.FormatInt(mid, 10) }

// StreamMid is the user of a user stream; ok is false for another stream.
func StreamMid(stream string) (mid int64, ok bool) {
	s, ok := strings.CutPrefix(stream, "user:")
	if !ok {
		return 0, false
	}
	mid, err := strconv.ParseInt(s, 10, 64)
	return mid, err == nil
}

// StreamRoom is the room of a room stream; ok is false for another stream.
func StreamRoom(stream string) (room string, ok bool) { return strings.CutPrefix(stream, "room:") }

// StreamPos is a message's place in a stream.
type StreamPos struct {
	Stream string
	Epoch  string
	Pos    uint64
}

// StreamLimit is what a stream's history keeps: at most Size messages, none
// older than TTL. Size 0 keeps none: the stream still gives positions (and
// so order), but a gap cannot be filled nor a client recovered. TTL 0 sets
// no age limit. A stream untouched by Append for its TTL (or, with TTL 0,
// the store's HistoryCaps.Idle) is forgotten whole: its next use starts a
// new epoch at position 1.
type StreamLimit struct {
	Size int
	TTL  time.Duration
}

// HistoryEntry is one message in a stream's history.
type HistoryEntry struct {
	Pos  uint64
	ID   string // the broker message id
	Op   int32
	Body []byte
	At   time.Time // when logic accepted it
	// Keys are the keys a key push was for: a node gives the entry only
	// to those connections of the user. Empty: the whole user, or a room.
	Keys []string
	// Void marks a position whose message was never accepted (the
	// publish after Append failed, the caller answered 503): nodes pass
	// over it, recovery and GET /im/history leave it out.
	Void bool
}

// History errors. Each names why the entries after a position cannot all
// be given; the caller tells the client, who resyncs.
var (
	// ErrEpochChanged: the stream's history was lost since the position
	// was given; the position means nothing in the current epoch.
	ErrEpochChanged = errors.New("stream epoch changed")
	// ErrTrimmed: some entries after the position are older than the
	// history keeps.
	ErrTrimmed = errors.New("stream history trimmed")
	// ErrFuturePosition: the position is past the stream's last one.
	ErrFuturePosition = errors.New("position past the stream's last")
)

// History gives each stream's messages their positions and keeps the last
// of them. adapters/memory keeps it in one process, adapters/redis for a
// cluster; both pass adapters/historytest.
type History interface {
	// Append gives e the next position in each of streams, each in one
	// atomic step, and keeps it within limit(stream). Of two Appends to a
	// stream, the one that returned first has the lower position. The
	// result is in the order of streams; e.Pos is ignored. At most
	// MaxHistoryStreams streams of at most MaxStreamLen bytes
	// (ErrHistoryRequest otherwise, nothing appended).
	Append(ctx context.Context, streams []string, e HistoryEntry, limit func(stream string) StreamLimit) ([]StreamPos, error)
	// Since returns up to max (at most MaxHistorySince; ≤ 0 means that)
	// entries of stream after position after in epoch, oldest first, and
	// the stream's current top. With ErrEpochChanged, ErrTrimmed or
	// ErrFuturePosition it returns the top and no entries. Epoch "" with
	// after 0 asks for everything kept, never ErrTrimmed (a client with
	// no state; logic's unacked messages after ErrTrimmed); epoch "" with
	// after > 0 is ErrEpochChanged. A position in the epoch is exact:
	// (epoch, 0) is ErrTrimmed once position 1 is no longer kept. The
	// entries' bodies are the store's: read them, never write them.
	Since(ctx context.Context, stream, epoch string, after uint64, max int) ([]HistoryEntry, StreamPos, error)
	// Tops returns each stream's epoch and last position (0 for a stream
	// with no message yet), in the order of streams. A stream never seen
	// is given its epoch now, the one its first Append keeps unless it is
	// forgotten first: HistoryCaps.ReadIdle without an Append, or evicted
	// by a store at its caps (its first Append then starts another epoch;
	// nothing was kept in the one Tops gave). Bounds as Append's.
	Tops(ctx context.Context, streams []string) ([]StreamPos, error)
	// Ack moves stream's acknowledged position forward to pos (never
	// back); ErrEpochChanged if epoch is not the stream's, and
	// ErrFuturePosition past its last position.
	Ack(ctx context.Context, stream, epoch string, pos uint64) error
	// Acked returns stream's acknowledged position in its current epoch (0:
	// none). The cursor lives and dies with the stream's epoch.
	Acked(ctx context.Context, stream string) (StreamPos, error)
	// Void marks the entries at positions as never accepted: the caller
	// appended them, then failed to publish and answered that nothing
	// was accepted. Their positions stay taken; their bodies and keys are
	// never given again (memory lets them go at once, Redis when they are
	// trimmed). Since gives them with Void set and only Pos, ID and At,
	// so a node waiting on the position passes over it instead of waiting
	// again; recovery and GET /im/history leave them out. A position of
	// another epoch, not kept (size 0, trimmed) or not given yet is
	// passed over. Voiding twice is a no-op. At most MaxHistoryStreams
	// positions of streams of at most MaxStreamLen bytes
	// (ErrHistoryRequest otherwise, nothing voided).
	Void(ctx context.Context, positions []StreamPos) error
}
