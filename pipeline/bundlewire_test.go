package pipeline

import (
	"bytes"
	"maps"
	"strings"
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"imcloud/proto/pb"
)

// TestBundleWireMatchesProtobuf: what encodeBundle writes is the pb.Batch
// protobuf-go reads, and DecodeBundle reads what protobuf-go writes.
func TestBundleWireMatchesProtobuf(t *testing.T) {
	in := []*message.Message{
		message.NewMessage("id-1", []byte("payload one")),
		message.NewMessage("", nil),
		message.NewMessage("id-3", bytes.Repeat([]byte{0, 0xff}, 300)), // a length over one varint byte
	}
	in[0].Metadata.Set(MetaMessageID, "id-1")
	in[0].Metadata.Set(MetaPublishedAt, "1764000000000000000")
	in[0].Metadata.Set("empty", "")
	in[2].Metadata.Set("ключ", "значение")

	body, err := encodeBundle(in)
	if err != nil {
		t.Fatal(err)
	}
	var batch pb.Batch
	if err := proto.Unmarshal(body, &batch); err != nil {
		t.Fatalf("protobuf-go reads encodeBundle's body: %v", err)
	}
	if len(batch.Messages) != len(in) {
		t.Fatalf("protobuf-go reads %d envelopes, want %d", len(batch.Messages), len(in))
	}
	for i, e := range batch.Messages {
		md := message.Metadata{}
		for j := 0; j+1 < len(e.Meta); j += 2 {
			md[e.Meta[j]] = e.Meta[j+1]
		}
		if e.Uuid != in[i].UUID || !bytes.Equal(e.Payload, in[i].Payload) || !maps.Equal(md, in[i].Metadata) {
			t.Errorf("envelope %d: protobuf-go reads %q %q %v, want %q %q %v", i, e.Uuid, e.Payload, md, in[i].UUID, in[i].Payload, in[i].Metadata)
		}
	}

	body, err = proto.Marshal(&batch)
	if err != nil {
		t.Fatal(err)
	}
	out, err := DecodeBundle(body)
	if err != nil {
		t.Fatalf("decode protobuf-go's body: %v", err)
	}
	if len(out) != len(in) {
		t.Fatalf("decoded %d messages, want %d", len(out), len(in))
	}
	for i, m := range out {
		if m.UUID != in[i].UUID || !bytes.Equal(m.Payload, in[i].Payload) || !maps.Equal(m.Metadata, in[i].Metadata) {
			t.Errorf("message %d: %q %q %v, want %q %q %v", i, m.UUID, m.Payload, m.Metadata, in[i].UUID, in[i].Payload, in[i].Metadata)
		}
	}
	// A decoded payload is the message's own: the bundle's body may be
	// reused, and a kept (poisoned) message must not hold all of it.
	out[0].Payload[0] = 'X'
	if !bytes.Contains(body, []byte("payload one")) {
		t.Error("a decoded payload shares the bundle's body")
	}
}

// TestDecodeBundleRefuses: a body that is no well-formed Batch, with a
// string field that is not UTF-8 (each on its own: two halves of a
// character do not make one), or with more envelopes than any writer
// puts in one, is an error (the bundle is poisoned whole), as protobuf-go
// would refuse it; fields a newer writer adds are skipped.
func TestDecodeBundleRefuses(t *testing.T) {
	env := func(fields ...[]byte) []byte {
		b := protowire.AppendTag(nil, batchMessages, protowire.BytesType)
		return protowire.AppendBytes(b, bytes.Join(fields, nil))
	}
	str := func(n protowire.Number, s string) []byte {
		return protowire.AppendString(protowire.AppendTag(nil, n, protowire.BytesType), s)
	}
	good := env(str(envelopeUUID, "a"), str(envelopeMeta, "k"), str(envelopeMeta, "v"))
	for _, tc := range []struct {
		name string
		body []byte
		ok   bool
	}{
		{"good", good, true},
		{"empty", nil, true},
		{"truncated envelope", good[:len(good)-1], false},
		{"truncated tag", append(append([]byte(nil), good...), 0x80), false},
		{"length past the end", append(protowire.AppendTag(nil, batchMessages, protowire.BytesType), 0x7f), false},
		{"id not UTF-8", env(str(envelopeUUID, "\xff")), false},
		{"metadata not UTF-8", env(str(envelopeMeta, "k"), str(envelopeMeta, "\xc3")), false},
		{"a character split over id and key", env(str(envelopeUUID, "\xe2\x82"), str(envelopeMeta, "\xac"), str(envelopeMeta, "v")), false},
		{"a character split over key and value", env(str(envelopeMeta, "k\xe2"), str(envelopeMeta, "\x82\xacv")), false},
		{"a trailing key not UTF-8", env(str(envelopeMeta, "k"), str(envelopeMeta, "v"), str(envelopeMeta, "\xff")), false},
		{"an id not UTF-8 overwritten", env(str(envelopeUUID, "\xff"), str(envelopeUUID, "ok")), false},
		{"an unread map entry not UTF-8", env(str(envelopeMeta, "k"), str(envelopeMeta, "v"),
			protowire.AppendBytes(protowire.AppendTag(nil, envelopeMap, protowire.BytesType), str(mapEntryKey, "\xff"))), false},
		{"field number past the largest", append([]byte("\x8d\x8d\x8d\x8d\x30"), 0, 0, 0, 0), false},
		{"as many envelopes as a bundle holds", bytes.Repeat(env(), MaxBundle), true},
		{"more envelopes than a bundle holds", bytes.Repeat(env(), MaxBundle+1), false},
		{"unknown fields skipped", append(protowire.AppendVarint(protowire.AppendTag(nil, 9, protowire.VarintType), 7),
			env(protowire.AppendFixed32(protowire.AppendTag(nil, 7, protowire.Fixed32Type), 1), str(envelopeUUID, "a"))...), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msgs, err := DecodeBundle(tc.body)
			if (err == nil) != tc.ok {
				t.Fatalf("DecodeBundle: %d messages, %v; want ok=%v", len(msgs), err, tc.ok)
			}
		})
	}
}

// FuzzDecodeBundle: no body panics the decoder, and where protobuf-go
// reads a body too, both read the same messages.
func FuzzDecodeBundle(f *testing.F) {
	in := []*message.Message{message.NewMessage("x", []byte("p")), message.NewMessage("y", nil)}
	in[0].Metadata.Set("k", "v")
	body, err := encodeBundle(in)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(body)
	old, _ := proto.Marshal(&pb.Batch{Messages: []*pb.Envelope{{Uuid: "a", Metadata: map[string]string{"k": "v"}}}})
	f.Add(old)
	f.Fuzz(func(t *testing.T, body []byte) {
		msgs, err := DecodeBundle(body)
		var batch pb.Batch
		perr := proto.Unmarshal(body, &batch)
		if (err == nil) != (perr == nil) && len(batch.Messages) <= MaxBundle {
			t.Fatalf("DecodeBundle: %v; protobuf-go: %v", err, perr)
		}
		if err != nil || perr != nil {
			return
		}
		if len(msgs) != len(batch.Messages) {
			t.Fatalf("%d messages, protobuf-go %d", len(msgs), len(batch.Messages))
		}
		for i, e := range batch.Messages {
			md := message.Metadata{}
			if len(e.Meta) == 0 {
				maps.Copy(md, e.Metadata)
			}
			for j := 0; j+1 < len(e.Meta); j += 2 {
				md[e.Meta[j]] = e.Meta[j+1]
			}
			if msgs[i].UUID != e.Uuid || !bytes.Equal(msgs[i].Payload, e.Payload) || !maps.Equal(msgs[i].Metadata, md) {
				t.Fatalf("message %d: %q %q %v, protobuf-go %q %q %v", i, msgs[i].UUID, msgs[i].Payload, msgs[i].Metadata, e.Uuid, e.Payload, md)
			}
		}
	})
}

// TestNewBundleRefusesText: a message whose id or metadata is not UTF-8
// fails the bundle's publish, as proto.Marshal failed it, rather than
// reaching job as a bundle it cannot read and poisons whole.
func TestNewBundleRefusesText(t *testing.T) {
	good := message.NewMessage("a", []byte("p"))
	for _, bad := range []*message.Message{message.NewMessage("\xff", nil), message.NewMessage("b", nil)} {
		if bad.UUID == "b" {
			bad.Metadata.Set("room", "\xff")
		}
		if _, err := NewBundle([]*message.Message{good, bad}); err == nil {
			t.Errorf("NewBundle with %q %v: no error", bad.UUID, bad.Metadata)
		}
	}
}

// TestDecodeBundleNamesTheFault: a field number past the largest is
// reported as one, not as a body cut short.
func TestDecodeBundleNamesTheFault(t *testing.T) {
	_, err := DecodeBundle(append([]byte("\x8d\x8d\x8d\x8d\x30"), 0, 0, 0, 0))
	if err == nil || !strings.Contains(err.Error(), "invalid field number") {
		t.Fatalf("DecodeBundle: %v, want an invalid field number", err)
	}
}
