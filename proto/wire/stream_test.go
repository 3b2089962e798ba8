package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestStreamMsgRoundTrip(t *testing.T) {
	tests := []struct {
		name   string
		stream string
		epoch  string
		pos    uint64
		op     int32
		body   []byte
	}{
		{"room", "room:live://1000", "0123456789abcdef", 1, 1000, []byte(`{"text":"hi"}`)},
		{"user", "user:9223372036854775807", "e", 17, 1001, nil},
		{"longest fields", "room:" + strings.Repeat("a", MaxRoomLen-4) + "://b", strings.Repeat("Z", MaxEpochLen), MaxPos, 1 << 30, bytes.Repeat([]byte{0}, 64)},
		{"UTF-8 room", "room:chat://café", "A-_z", 2, 1000, []byte("\xff")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pkt, err := AppendStreamMsg([]byte("prefix"), 42, tt.stream, tt.epoch, tt.pos, tt.op, tt.body)
			if err != nil {
				t.Fatalf("AppendStreamMsg: %v", err)
			}
			if string(pkt[:6]) != "prefix" {
				t.Fatalf("dst's bytes were overwritten: %q", pkt[:6])
			}
			pkt = pkt[6:]
			if len(pkt) != StreamMsgSize(tt.stream, tt.epoch, tt.body) {
				t.Fatalf("packet of %d bytes, StreamMsgSize says %d", len(pkt), StreamMsgSize(tt.stream, tt.epoch, tt.body))
			}
			p, n, err := Decode(pkt, DefaultMaxBody)
			if err != nil || n != len(pkt) || p.Op != OpStreamMsg || p.Seq != 42 {
				t.Fatalf("Decode = %+v, %d, %v", p, n, err)
			}
			m, err := DecodeStreamMsg(p.Body)
			if err != nil {
				t.Fatalf("DecodeStreamMsg: %v", err)
			}
			if string(m.Stream) != tt.stream || string(m.Epoch) != tt.epoch || m.Pos != tt.pos || m.Op != tt.op || !bytes.Equal(m.Body, tt.body) {
				t.Fatalf("DecodeStreamMsg = %q %q %d %d %q", m.Stream, m.Epoch, m.Pos, m.Op, m.Body)
			}
		})
	}
}

func TestAppendStreamMsgRefusesLengths(t *testing.T) {
	tests := []struct{ stream, epoch string }{
		{"", "e"},
		{"room:a://b", ""},
		{strings.Repeat("s", MaxStreamLen+1), "e"},
		{"room:a://b", strings.Repeat("e", MaxEpochLen+1)},
	}
	for _, tt := range tests {
		dst := []byte("x")
		out, err := AppendStreamMsg(dst, 1, tt.stream, tt.epoch, 1, 1000, nil)
		if !errors.Is(err, ErrStreamMsg) || string(out) != "x" {
			t.Errorf("AppendStreamMsg(%d-byte stream, %d-byte epoch) = %q, %v; want dst unchanged and ErrStreamMsg", len(tt.stream), len(tt.epoch), out, err)
		}
	}
}

// streamBody builds an OpStreamMsg body by hand, so that tests can lie in
// any field.
func streamBody(sl int, stream string, el int, epoch string, pos uint64, op int32, body string) []byte {
	b := []byte{byte(sl)}
	b = append(b, stream...)
	b = append(b, byte(el))
	b = append(b, epoch...)
	b = binary.BigEndian.AppendUint64(b, pos)
	b = binary.BigEndian.AppendUint32(b, uint32(op))
	return append(b, body...)
}

func TestDecodeStreamMsgAbuse(t *testing.T) {
	good := streamBody(10, "room:a://b", 2, "ep", 5, 1000, "m")
	if _, err := DecodeStreamMsg(good); err != nil {
		t.Fatalf("the good body: %v", err)
	}
	tests := []struct {
		name string
		body []byte
	}{
		{"empty", nil},
		{"shorter than the fixed part", good[:streamMsgFixed-1]},
		{"truncated in the stream", good[:5]},
		{"truncated in the epoch", good[:13]},
		{"truncated in the position", good[:17]},
		{"truncated in the operation", good[:24]},
		{"stream length 0", streamBody(0, "", 2, "ep", 5, 1000, "xxxxxxxxxx")},
		{"stream length past the body", streamBody(200, "room:a://b", 2, "ep", 5, 1000, "")},
		{"stream length over the limit", streamBody(MaxStreamLen+1, "room:"+strings.Repeat("a", MaxStreamLen-4), 2, "ep", 5, 1000, "")},
		{"stream length short by one", streamBody(9, "room:a://b", 2, "ep", 5, 1000, "")},
		{"epoch length 0", streamBody(10, "room:a://b", 0, "", 5, 1000, "xxxxxxxx")},
		{"epoch length over the limit", streamBody(10, "room:a://b", MaxEpochLen+1, strings.Repeat("e", MaxEpochLen+1), 5, 1000, "")},
		{"epoch length past the body", streamBody(10, "room:a://b", 30, "ep", 5, 1000, "")},
		{"unknown stream class", streamBody(9, "chan:a://b", 2, "ep", 5, 1000, "")},
		{"room without type", streamBody(8, "room:abc", 2, "ep", 5, 1000, "")},
		{"room stream not UTF-8", streamBody(10, "room:a://\xff", 2, "ep", 5, 1000, "")},
		{"room stream with a control character", streamBody(10, "room:a://\x00", 2, "ep", 5, 1000, "")},
		{"room stream with a space", streamBody(11, "room:a:// b", 2, "ep", 5, 1000, "")},
		{"user stream with a sign", streamBody(7, "user:+1", 2, "ep", 5, 1000, "")},
		{"user stream with a leading zero", streamBody(7, "user:01", 2, "ep", 5, 1000, "")},
		{"user stream of mid 0", streamBody(6, "user:0", 2, "ep", 5, 1000, "")},
		{"user stream past int64", streamBody(24, "user:9223372036854775808", 2, "ep", 5, 1000, "")},
		{"epoch with a dot", streamBody(10, "room:a://b", 2, "e.", 5, 1000, "")},
		{"epoch not UTF-8", streamBody(10, "room:a://b", 2, "e\xc3", 5, 1000, "")},
		{"position 0", streamBody(10, "room:a://b", 2, "ep", 0, 1000, "")},
		{"position past MaxPos", streamBody(10, "room:a://b", 2, "ep", MaxPos+1, 1000, "")},
		{"position 2^64-1", streamBody(10, "room:a://b", 2, "ep", ^uint64(0), 1000, "")},
		{"goim operation", streamBody(10, "room:a://b", 2, "ep", 5, OpRaw, "")},
		{"negative operation", streamBody(10, "room:a://b", 2, "ep", 5, -1000, "")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if m, err := DecodeStreamMsg(tt.body); !errors.Is(err, ErrStreamMsg) || !errors.Is(err, ErrInvalid) {
				t.Fatalf("DecodeStreamMsg(%q) = %+v, %v; want ErrStreamMsg", tt.body, m, err)
			}
		})
	}
}

// A stream message travels inside op 9 batches like any packet.
func TestStreamMsgInBatch(t *testing.T) {
	var batch []byte
	for i := range 3 {
		var err error
		if batch, err = AppendStreamMsg(batch, 0, "user:7", "ep", uint64(i+1), 1000, []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	pkts, err := DecodeAll(Encode(OpRaw, 0, batch), 1<<20)
	if err != nil || len(pkts) != 3 {
		t.Fatalf("DecodeAll = %d packets, %v", len(pkts), err)
	}
	for i, p := range pkts {
		m, err := DecodeStreamMsg(p.Body)
		if err != nil || p.Op != OpStreamMsg || m.Pos != uint64(i+1) || !bytes.Equal(m.Body, []byte{byte(i)}) {
			t.Fatalf("packet %d: op %d, %+v, %v", i, p.Op, m, err)
		}
	}
}

func TestAckRoundTrip(t *testing.T) {
	for _, tt := range []struct {
		epoch string
		pos   uint64
	}{{"e", 1}, {"0123456789abcdef", 500}, {strings.Repeat("x", MaxEpochLen), MaxPos}} {
		b := AppendAck(nil, tt.epoch, tt.pos)
		if len(b) != 1+len(tt.epoch)+8 {
			t.Fatalf("ack of %d bytes", len(b))
		}
		epoch, pos, err := DecodeAck(b)
		if err != nil || epoch != tt.epoch || pos != tt.pos {
			t.Fatalf("DecodeAck(%q) = %q, %d, %v", b, epoch, pos, err)
		}
	}
}

func TestDecodeAckAbuse(t *testing.T) {
	good := AppendAck(nil, "ep", 3)
	tests := []struct {
		name string
		body []byte
	}{
		{"empty", nil},
		{"epoch length only", []byte{2}},
		{"truncated position", good[:len(good)-1]},
		{"a byte too many", append(append([]byte{}, good...), 0)},
		{"epoch length 0", AppendAck(nil, "", 3)},
		{"epoch length over the limit", AppendAck(nil, strings.Repeat("e", MaxEpochLen+1), 3)},
		{"epoch with a control character", AppendAck(nil, "e\n", 3)},
		{"epoch not UTF-8", AppendAck(nil, "\xff", 3)},
		{"position 0", AppendAck(nil, "ep", 0)},
		{"position past MaxPos", AppendAck(nil, "ep", MaxPos+1)},
		{"position 2^64-1", AppendAck(nil, "ep", ^uint64(0))},
		{"length byte lies", append([]byte{9}, good[1:]...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if e, p, err := DecodeAck(tt.body); !errors.Is(err, ErrAck) {
				t.Fatalf("DecodeAck(%q) = %q, %d, %v; want ErrAck", tt.body, e, p, err)
			}
		})
	}
}

func TestValidStream(t *testing.T) {
	for s, ok := range map[string]bool{
		"room:live://1":            true,
		"user:1":                   true,
		"user:9223372036854775807": true,
		"room:" + strings.Repeat("a", 124) + "://b": true,
		"room:" + strings.Repeat("a", 125) + "://b": false, // room over MaxRoomLen
		"":                false,
		"room:":           false,
		"user:":           false,
		"user:-1":         false,
		"user:1a":         false,
		"user:1 ":         false,
		"Room:live://1":   false,
		"room:live://*":   false,
		"room:live://a,b": false,
		"live://1":        false,
	} {
		if err := ValidStream(s); (err == nil) != ok {
			t.Errorf("ValidStream(%q) = %v, want ok %v", s, err, ok)
		}
	}
}

func FuzzDecodeStreamMsg(f *testing.F) {
	f.Add(streamBody(10, "room:a://b", 2, "ep", 5, 1000, "m"))
	f.Add(streamBody(6, "user:7", 16, "0123456789abcdef", MaxPos, 1<<31-1, ""))
	f.Add(streamBody(200, "room:a://b", 2, "ep", 5, 1000, ""))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeStreamMsg(b)
		if err != nil {
			if !errors.Is(err, ErrStreamMsg) {
				t.Fatalf("error %v does not wrap ErrStreamMsg", err)
			}
			return
		}
		// What decodes re-encodes to the same bytes: one reading only.
		pkt, err := AppendStreamMsg(nil, 0, string(m.Stream), string(m.Epoch), m.Pos, m.Op, m.Body)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", m, err)
		}
		if !bytes.Equal(pkt[HeaderLen:], b) {
			t.Fatalf("re-encoded %q, decoded from %q", pkt[HeaderLen:], b)
		}
	})
}

func FuzzDecodeAck(f *testing.F) {
	f.Add(AppendAck(nil, "0123456789abcdef", 1))
	f.Add(AppendAck(nil, "ep", ^uint64(0)))
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, b []byte) {
		epoch, pos, err := DecodeAck(b)
		if err != nil {
			if !errors.Is(err, ErrAck) {
				t.Fatalf("error %v does not wrap ErrAck", err)
			}
			return
		}
		if got := AppendAck(nil, epoch, pos); !bytes.Equal(got, b) {
			t.Fatalf("re-encoded %q, decoded from %q", got, b)
		}
	})
}

func ExampleAppendStreamMsg() {
	pkt, _ := AppendStreamMsg(nil, 1, "room:live://1", "3f2a", 17, 1000, []byte("hi"))
	fmt.Printf("% x\n", pkt[HeaderLen:])
	// Output: 0d 72 6f 6f 6d 3a 6c 69 76 65 3a 2f 2f 31 04 33 66 32 61 00 00 00 00 00 00 00 11 00 00 03 e8 68 69
}
