// Package wire encodes and decodes goim's v2 client protocol: a 16-byte
// big-endian header (packet length, header length, version, operation,
// sequence) followed by the body.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Header layout.
const (
	HeaderLen = 16
	Version   = 1

	// DefaultMaxBody is the body limit when a node is not configured otherwise.
	DefaultMaxBody = 4096
)

// Operations of the goim v2 protocol.
const (
	OpHeartbeat       int32 = 2
	OpHeartbeatReply  int32 = 3
	OpSendMsg         int32 = 4
	OpSendMsgReply    int32 = 5
	OpAuth            int32 = 7
	OpAuthReply       int32 = 8
	OpRaw             int32 = 9
	OpChangeRoom      int32 = 12
	OpChangeRoomReply int32 = 13
	OpSub             int32 = 14
	OpSubReply        int32 = 15
	OpUnsub           int32 = 16
	OpUnsubReply      int32 = 17
	MinBusinessOp     int32 = 1000
)

// Decoding errors. Each one is a protocol violation: the peer is closed.
var (
	ErrHeaderLen = errors.New("wire: header length is not 16")
	ErrTooLarge  = errors.New("wire: body exceeds the limit")
	ErrShort     = errors.New("wire: packet shorter than its header says")
)

// Packet is one decoded protocol packet. Body aliases the decoding buffer.
type Packet struct {
	Ver  uint16
	Op   int32
	Seq  int32
	Body []byte
}

// Size is the encoded length of p.
func (p Packet) Size() int { return HeaderLen + len(p.Body) }

// PutHeader writes the header of a packet with a body of bodyLen bytes
// into the first HeaderLen bytes of h.
func PutHeader(h []byte, bodyLen int, op, seq int32) {
	binary.BigEndian.PutUint32(h[0:], uint32(HeaderLen+bodyLen))
	binary.BigEndian.PutUint16(h[4:], HeaderLen)
	binary.BigEndian.PutUint16(h[6:], Version)
	binary.BigEndian.PutUint32(h[8:], uint32(op))
	binary.BigEndian.PutUint32(h[12:], uint32(seq))
}

// Append encodes a packet onto dst and returns the extended slice.
func Append(dst []byte, op, seq int32, body []byte) []byte {
	var h [HeaderLen]byte
	PutHeader(h[:], len(body), op, seq)
	dst = append(dst, h[:]...)
	return append(dst, body...)
}

// Encode returns p as a new byte slice.
func Encode(op, seq int32, body []byte) []byte {
	return Append(make([]byte, 0, HeaderLen+len(body)), op, seq, body)
}

// SetSeq rewrites the sequence field of the encoded packet at the start of b.
func SetSeq(b []byte, seq int32) {
	binary.BigEndian.PutUint32(b[12:], uint32(seq))
}

// parseHeader validates a header and returns the body length it announces.
func parseHeader(h []byte, maxBody int) (Packet, int, error) {
	packLen := binary.BigEndian.Uint32(h[0:])
	headLen := binary.BigEndian.Uint16(h[4:])
	if headLen != HeaderLen {
		return Packet{}, 0, fmt.Errorf("%w: got %d", ErrHeaderLen, headLen)
	}
	if packLen < HeaderLen {
		return Packet{}, 0, fmt.Errorf("%w: packet length %d", ErrShort, packLen)
	}
	bodyLen := int64(packLen) - HeaderLen
	if bodyLen > int64(maxBody) {
		return Packet{}, 0, fmt.Errorf("%w: %d > %d bytes", ErrTooLarge, bodyLen, maxBody)
	}
	p := Packet{
		Ver: binary.BigEndian.Uint16(h[6:]),
		Op:  int32(binary.BigEndian.Uint32(h[8:])),
		Seq: int32(binary.BigEndian.Uint32(h[12:])),
	}
	return p, int(bodyLen), nil
}

// Decode reads the first packet of buf and returns it with the number of
// bytes it used. The body aliases buf.
func Decode(buf []byte, maxBody int) (Packet, int, error) {
	if len(buf) < HeaderLen {
		return Packet{}, 0, fmt.Errorf("%w: %d header bytes", ErrShort, len(buf))
	}
	p, n, err := parseHeader(buf, maxBody)
	if err != nil {
		return Packet{}, 0, err
	}
	if len(buf) < HeaderLen+n {
		return Packet{}, 0, fmt.Errorf("%w: want %d body bytes, have %d", ErrShort, n, len(buf)-HeaderLen)
	}
	p.Body = buf[HeaderLen : HeaderLen+n]
	return p, HeaderLen + n, nil
}

// DecodeAll splits buf, which must hold whole packets back to back (a
// WebSocket frame, or an op 9 body), into packets; op 9 packets are
// flattened one level so callers see the packets a batch carries.
func DecodeAll(buf []byte, maxBody int) ([]Packet, error) {
	return AppendPackets(nil, buf, maxBody)
}

// AppendPackets is DecodeAll appending to out, so that a reader can reuse
// one slice for every frame.
func AppendPackets(out []Packet, buf []byte, maxBody int) ([]Packet, error) {
	for len(buf) > 0 {
		p, n, err := Decode(buf, maxBody)
		if err != nil {
			return out, err
		}
		buf = buf[n:]
		if p.Op == OpRaw {
			if out, err = AppendPackets(out, p.Body, maxBody); err != nil {
				return out, err
			}
			continue
		}
		out = append(out, p)
	}
	return out, nil
}

// Reader reads packets from a stream, reusing one buffer: a returned
// packet's body is valid until the next call to Read.
type Reader struct {
	r       io.Reader
	maxBody int
	buf     []byte
}

// NewReader returns a Reader that rejects bodies over maxBody bytes.
func NewReader(r io.Reader, maxBody int) *Reader {
	return &Reader{r: r, maxBody: maxBody, buf: make([]byte, HeaderLen)}
}

// Read reads the next packet.
func (r *Reader) Read() (Packet, error) {
	if _, err := io.ReadFull(r.r, r.buf[:HeaderLen]); err != nil {
		return Packet{}, err
	}
	p, n, err := parseHeader(r.buf[:HeaderLen], r.maxBody)
	if err != nil {
		return Packet{}, err
	}
	if cap(r.buf) < n {
		r.buf = make([]byte, max(n, HeaderLen))
	}
	p.Body = r.buf[:n]
	if _, err := io.ReadFull(r.r, p.Body); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Packet{}, err
	}
	return p, nil
}
