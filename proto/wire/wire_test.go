package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		op   int32
		seq  int32
		body []byte
	}{
		{"empty body", OpHeartbeat, 1, nil},
		{"auth", OpAuth, 7, []byte(`{"mid":1}`)},
		{"business op", 1000, -1, bytes.Repeat([]byte("x"), DefaultMaxBody)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := Encode(tt.op, tt.seq, tt.body)
			if len(b) != HeaderLen+len(tt.body) {
				t.Fatalf("encoded length %d, want %d", len(b), HeaderLen+len(tt.body))
			}
			p, n, err := Decode(b, DefaultMaxBody)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if n != len(b) || p.Op != tt.op || p.Seq != tt.seq || p.Ver != Version || !bytes.Equal(p.Body, tt.body) {
				t.Fatalf("Decode = %+v (n=%d), want op=%d seq=%d body=%q", p, n, tt.op, tt.seq, tt.body)
			}
			sp, err := NewReader(bytes.NewReader(b), DefaultMaxBody).Read()
			if err != nil {
				t.Fatalf("Reader.Read: %v", err)
			}
			if sp.Op != tt.op || sp.Seq != tt.seq || !bytes.Equal(sp.Body, tt.body) {
				t.Fatalf("Reader.Read = %+v", sp)
			}
		})
	}
}

func header(packLen uint32, headLen uint16) []byte {
	h := make([]byte, HeaderLen)
	binary.BigEndian.PutUint32(h[0:], packLen)
	binary.BigEndian.PutUint16(h[4:], headLen)
	binary.BigEndian.PutUint16(h[6:], Version)
	binary.BigEndian.PutUint32(h[8:], uint32(OpHeartbeat))
	return h
}

func TestDecodeErrors(t *testing.T) {
	tests := []struct {
		name string
		buf  []byte
		want error
	}{
		{"short header", []byte{0, 0, 0}, ErrShort},
		{"wrong header length", header(16, 20), ErrHeaderLen},
		{"packet length below header", header(4, 16), ErrShort},
		{"body over limit", header(16+DefaultMaxBody+1, 16), ErrTooLarge},
		{"huge length", header(0xffffffff, 16), ErrTooLarge},
		{"truncated body", append(header(20, 16), 1, 2), ErrShort},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := Decode(tt.buf, DefaultMaxBody); !errors.Is(err, tt.want) {
				t.Fatalf("Decode error = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestReaderTruncatedBody(t *testing.T) {
	b := Encode(1000, 1, []byte("hello"))
	_, err := NewReader(bytes.NewReader(b[:len(b)-2]), DefaultMaxBody).Read()
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("Read error = %v, want unexpected EOF", err)
	}
}

func TestDecodeAllFlattensBatches(t *testing.T) {
	inner := Append(Encode(1000, 1, []byte("a")), 1001, 2, []byte("bc"))
	frame := Append(Encode(OpRaw, 0, inner), 1002, 3, []byte("d"))
	ps, err := DecodeAll(frame, DefaultMaxBody)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		op   int32
		body string
	}{{1000, "a"}, {1001, "bc"}, {1002, "d"}}
	if len(ps) != len(want) {
		t.Fatalf("got %d packets, want %d", len(ps), len(want))
	}
	for i, w := range want {
		if ps[i].Op != w.op || string(ps[i].Body) != w.body {
			t.Errorf("packet %d = op %d %q, want op %d %q", i, ps[i].Op, ps[i].Body, w.op, w.body)
		}
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(Encode(OpAuth, 1, []byte(`{"mid":1}`)))
	f.Add(Encode(OpRaw, 0, Encode(1000, 1, []byte("x"))))
	f.Add(header(16, 20))
	f.Add(header(0xffffffff, 16))
	f.Fuzz(func(t *testing.T, b []byte) {
		ps, err := DecodeAll(b, 256)
		if err == nil {
			for _, p := range ps {
				if len(p.Body) > 256 {
					t.Fatalf("body of %d bytes passed a 256-byte limit", len(p.Body))
				}
			}
		}
		r := NewReader(bytes.NewReader(b), 256)
		for {
			if _, err := r.Read(); err != nil {
				break
			}
		}
	})
}
