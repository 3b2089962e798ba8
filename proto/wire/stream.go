package wire

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
)

// Operations of positioned delivery, recovery and acks (issue 12). goim
// uses 0–17 and business messages are 1000 or more; these sit just above
// goim's with room to spare, so a goim client never sees them: they are
// only sent to, and only accepted from, a connection that opted in.
const (
	// OpStreamMsg (server → client) is a business message with its
	// stream, epoch and position: see AppendStreamMsg.
	OpStreamMsg int32 = 20
	// OpRecover (client → server) lists the client's last positions: see
	// DecodeRecoverRequest.
	OpRecover int32 = 21
	// OpRecoverReply (server → client) answers OpRecover per stream: see
	// AppendRecoverReply.
	OpRecoverReply int32 = 22
	// OpAck (client → server) acknowledges the user stream up to a
	// position, cumulatively: see AppendAck.
	OpAck int32 = 23
)

// Limits of the stream fields.
const (
	// MaxStreamLen bounds a stream name: "room:" and a room name, or
	// "user:" and a mid.
	MaxStreamLen = len(roomPrefix) + MaxRoomLen
	// MaxEpochLen bounds an epoch (stores make 16 hex characters).
	MaxEpochLen = 32
	// MaxPos is the largest position a client may send or receive: 2^53-1,
	// the largest integer a JavaScript number holds exactly, so a browser
	// client compares positions without a big-integer type. A stream
	// taking a million messages a second reaches it in 285 years.
	MaxPos = 1<<53 - 1
	// MaxRecoverStreams bounds the streams of one recover request: the
	// rooms a token may join (MaxClaimRooms) and the user's own stream.
	MaxRecoverStreams = MaxClaimRooms + 1
	// MaxRecoverBytes bounds a recover request's body before it is parsed,
	// whatever the node's packet limit: MaxRecoverStreams entries of the
	// longest stream and epoch take 13.7 KB (measured, compact JSON).
	MaxRecoverBytes = 16 << 10
	// streamMsgFixed is the positioned body without stream, epoch and
	// business body: two length bytes, the position and the operation.
	streamMsgFixed = 1 + 1 + 8 + 4
	// maxAckLen bounds an ack body: epoch length, epoch, position.
	maxAckLen = 1 + MaxEpochLen + 8
)

const (
	roomPrefix = "room:"
	userPrefix = "user:"
)

// Stream errors. Each is a protocol violation by the peer; all wrap
// ErrInvalid.
var (
	ErrStreamMsg = fmt.Errorf("%w stream message", ErrInvalid)
	ErrRecover   = fmt.Errorf("%w recover request", ErrInvalid)
	ErrAck       = fmt.Errorf("%w ack", ErrInvalid)
)

// ValidStream checks a stream name: "room:" and a room (ValidRoom), or
// "user:" and a positive mid in decimal without leading zeros or sign.
func ValidStream(s string) error {
	if room, ok := strings.CutPrefix(s, roomPrefix); ok {
		if err := ValidRoom(room); err != nil {
			return fmt.Errorf("stream: %w", err)
		}
		return nil
	}
	if mid, ok := strings.CutPrefix(s, userPrefix); ok {
		if _, err := parseMid(mid); err != nil {
			return fmt.Errorf("stream: %w", err)
		}
		return nil
	}
	return fmt.Errorf("stream: %w: want room:<room> or user:<mid>", ErrInvalid)
}

// parseMid parses the mid of a user stream strictly: strconv accepts "+1"
// and "007", which would name the stream of mid 1 or 7 a second way.
func parseMid(s string) (int64, error) {
	if s == "" || len(s) > 19 || s[0] == '0' {
		return 0, fmt.Errorf("%w: mid %q is not a positive decimal", ErrInvalid, s)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("%w: mid %q is not a positive decimal", ErrInvalid, s)
		}
	}
	mid, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: mid %q: out of range", ErrInvalid, s)
	}
	return mid, nil
}

// ValidEpoch checks an epoch: 1 to MaxEpochLen bytes of ASCII letters,
// digits, '-' and '_'.
func ValidEpoch(s string) error {
	if s == "" || len(s) > MaxEpochLen {
		return fmt.Errorf("epoch: %w: %d bytes, want 1 to %d", ErrInvalid, len(s), MaxEpochLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return fmt.Errorf("epoch: %w: byte %#x is not a letter, digit, '-' or '_'", ErrInvalid, c)
		}
	}
	return nil
}

// StreamMsg is a decoded OpStreamMsg body. Stream, Epoch and Body alias
// the decoding buffer until copied.
type StreamMsg struct {
	Stream []byte
	Epoch  []byte
	Pos    uint64
	Op     int32
	Body   []byte
}

// AppendStreamMsg appends a whole OpStreamMsg packet to dst: the 16-byte
// header, then the body
//
//	stream length (1 byte) | stream | epoch length (1 byte) | epoch |
//	position (8 bytes, big-endian) | business operation (4 bytes) | message
//
// It allocates only when dst has no room, so a node builds each message's
// packet once and gives the same bytes to every connection (SetSeq). The
// fields are the node's own (logic gave them), so only their lengths are
// checked: a longer field would not fit its length byte.
func AppendStreamMsg(dst []byte, seq int32, stream, epoch string, pos uint64, op int32, body []byte) ([]byte, error) {
	if len(stream) == 0 || len(stream) > MaxStreamLen || len(epoch) == 0 || len(epoch) > MaxEpochLen {
		return dst, fmt.Errorf("%w: stream of %d bytes or epoch of %d", ErrStreamMsg, len(stream), len(epoch))
	}
	n := streamMsgFixed + len(stream) + len(epoch) + len(body)
	var h [HeaderLen]byte
	PutHeader(h[:], n, OpStreamMsg, seq)
	dst = append(dst, h[:]...)
	dst = append(dst, byte(len(stream)))
	dst = append(dst, stream...)
	dst = append(dst, byte(len(epoch)))
	dst = append(dst, epoch...)
	dst = binary.BigEndian.AppendUint64(dst, pos)
	dst = binary.BigEndian.AppendUint32(dst, uint32(op))
	return append(dst, body...), nil
}

// StreamMsgSize is the length of the packet AppendStreamMsg makes.
func StreamMsgSize(stream, epoch string, body []byte) int {
	return HeaderLen + streamMsgFixed + len(stream) + len(epoch) + len(body)
}

// DecodeStreamMsg decodes an OpStreamMsg body strictly: every length must
// fit, the stream and epoch must be valid, the position 1 to MaxPos and the
// operation a business one (MinBusinessOp or more). The result aliases b.
func DecodeStreamMsg(b []byte) (StreamMsg, error) {
	var m StreamMsg
	if len(b) < streamMsgFixed {
		return m, fmt.Errorf("%w: %d bytes, at least %d", ErrStreamMsg, len(b), streamMsgFixed)
	}
	sl := int(b[0])
	if sl == 0 || sl > MaxStreamLen || len(b) < 1+sl+1 {
		return m, fmt.Errorf("%w: stream length %d in %d bytes", ErrStreamMsg, sl, len(b))
	}
	m.Stream = b[1 : 1+sl]
	rest := b[1+sl:]
	el := int(rest[0])
	if el == 0 || el > MaxEpochLen || len(rest) < 1+el+8+4 {
		return m, fmt.Errorf("%w: epoch length %d in %d bytes", ErrStreamMsg, el, len(rest))
	}
	m.Epoch = rest[1 : 1+el]
	rest = rest[1+el:]
	m.Pos = binary.BigEndian.Uint64(rest)
	m.Op = int32(binary.BigEndian.Uint32(rest[8:]))
	m.Body = rest[12:]
	if err := ValidStream(string(m.Stream)); err != nil {
		return m, fmt.Errorf("%w: %w", ErrStreamMsg, err)
	}
	if err := ValidEpoch(string(m.Epoch)); err != nil {
		return m, fmt.Errorf("%w: %w", ErrStreamMsg, err)
	}
	if m.Pos == 0 || m.Pos > MaxPos {
		return m, fmt.Errorf("%w: position %d, want 1 to %d", ErrStreamMsg, m.Pos, uint64(MaxPos))
	}
	if m.Op < MinBusinessOp {
		return m, fmt.Errorf("%w: operation %d is not a business one", ErrStreamMsg, m.Op)
	}
	return m, nil
}

// AppendAck appends an OpAck body: epoch length (1 byte), epoch, position
// (8 bytes, big-endian) — at most 41 bytes, as acks are frequent.
func AppendAck(dst []byte, epoch string, pos uint64) []byte {
	dst = append(dst, byte(len(epoch)))
	dst = append(dst, epoch...)
	return binary.BigEndian.AppendUint64(dst, pos)
}

// DecodeAck decodes an OpAck body strictly: exactly an epoch and a
// position, the position 1 to MaxPos.
func DecodeAck(b []byte) (epoch string, pos uint64, err error) {
	if len(b) < 1 || len(b) > maxAckLen || len(b) != 1+int(b[0])+8 {
		return "", 0, fmt.Errorf("%w: %d bytes", ErrAck, len(b))
	}
	e := b[1 : 1+b[0]]
	if err := ValidEpoch(string(e)); err != nil {
		return "", 0, fmt.Errorf("%w: %w", ErrAck, err)
	}
	pos = binary.BigEndian.Uint64(b[1+len(e):])
	if pos == 0 || pos > MaxPos {
		return "", 0, fmt.Errorf("%w: position %d, want 1 to %d", ErrAck, pos, uint64(MaxPos))
	}
	return string(e), pos, nil
}
