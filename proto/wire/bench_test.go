package wire

import (
	"bytes"
	"testing"
)

var sink []byte

func BenchmarkAppend(b *testing.B) {
	body := bytes.Repeat([]byte("x"), 128)
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	b.SetBytes(int64(HeaderLen + len(body)))
	for b.Loop() {
		buf = Append(buf[:0], 1000, 1, body)
	}
	sink = buf
}

func BenchmarkDecode(b *testing.B) {
	pkt := Encode(1000, 1, bytes.Repeat([]byte("x"), 128))
	b.ReportAllocs()
	b.SetBytes(int64(len(pkt)))
	for b.Loop() {
		p, _, err := Decode(pkt, DefaultMaxBody)
		if err != nil {
			b.Fatal(err)
		}
		sink = p.Body
	}
}

func BenchmarkReader(b *testing.B) {
	var stream []byte
	for range 1000 {
		stream = Append(stream, 1000, 1, bytes.Repeat([]byte("x"), 128))
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(stream) / 1000))
	r := bytes.NewReader(stream)
	pr := NewReader(r, DefaultMaxBody)
	for i := 0; b.Loop(); i++ {
		if i%1000 == 0 {
			r.Reset(stream)
		}
		p, err := pr.Read()
		if err != nil {
			b.Fatal(err)
		}
		sink = p.Body
	}
}

// BenchmarkAppendStreamMsg is the positioned packet a node builds once per
// message for its opted-in connections; it must not allocate.
func BenchmarkAppendStreamMsg(b *testing.B) {
	body := bytes.Repeat([]byte("x"), 128)
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	b.SetBytes(int64(StreamMsgSize("room:live://1000", "0123456789abcdef", body)))
	for b.Loop() {
		var err error
		if buf, err = AppendStreamMsg(buf[:0], 1, "room:live://1000", "0123456789abcdef", 123456, 1000, body); err != nil {
			b.Fatal(err)
		}
	}
	sink = buf
}

func BenchmarkDecodeStreamMsg(b *testing.B) {
	pkt, err := AppendStreamMsg(nil, 1, "room:live://1000", "0123456789abcdef", 123456, 1000, bytes.Repeat([]byte("x"), 128))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(pkt) - HeaderLen))
	for b.Loop() {
		m, err := DecodeStreamMsg(pkt[HeaderLen:])
		if err != nil {
			b.Fatal(err)
		}
		sink = m.Body
	}
}
