package pipeline

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/ThreeDotsLabs/watermill/message"
	"google.golang.org/protobuf/encoding/protowire"
)

// A bundle's body is a pb.Batch (proto/push.proto), written and read
// here field by field with protowire rather than by protobuf-go's
// reflective Marshal and Unmarshal, which allocate every envelope, its
// list of metadata strings and each string apart: decoding was 12 % of a
// standalone node's CPU in batches of 100 and encoding 5 %, and the two
// were a fifth of the bytes it allocated (pprof, issue 15). Here an
// envelope costs its message, one string holding all its text and a copy
// of its payload. The wire format is unchanged: a test reads what
// encodeBundle writes with protobuf-go and DecodeBundle reads what
// protobuf-go writes, including the metadata map older writers set.

// Field numbers of pb.Batch and pb.Envelope.
const (
	batchMessages   protowire.Number = 1
	envelopeUUID    protowire.Number = 1
	envelopeMap     protowire.Number = 2 // map<string, string>: older writers
	envelopePayload protowire.Number = 3
	envelopeMeta    protowire.Number = 4 // repeated string: key, value, …
	mapEntryKey     protowire.Number = 1
	mapEntryValue   protowire.Number = 2
)

// errNotUTF8 refuses a string field that is not UTF-8, as protobuf
// requires of strings and protobuf-go checks.
var errNotUTF8 = errors.New("string field is not UTF-8")

// consumeTag is protowire.ConsumeTag refusing field numbers past
// protowire.MaxValidNumber as well, as protobuf-go does.
func consumeTag(b []byte) (protowire.Number, protowire.Type, int) {
	num, typ, n := protowire.ConsumeTag(b)
	if n >= 0 && !num.IsValid() {
		return 0, 0, -2 // protowire's errCodeFieldNumber: ParseError says "invalid field number"
	}
	return num, typ, n
}

// envelopeSize is the encoded size of m's envelope.
func envelopeSize(m *message.Message) int {
	n := 0
	if m.UUID != "" {
		n += protowire.SizeTag(envelopeUUID) + protowire.SizeBytes(len(m.UUID))
	}
	if len(m.Payload) > 0 {
		n += protowire.SizeTag(envelopePayload) + protowire.SizeBytes(len(m.Payload))
	}
	for k, v := range m.Metadata {
		n += 2*protowire.SizeTag(envelopeMeta) + protowire.SizeBytes(len(k)) + protowire.SizeBytes(len(v))
	}
	return n
}

// encodeBundle writes msgs as a pb.Batch, each metadata in the flat form.
// A message whose id or metadata is not UTF-8 is refused, as
// proto.Marshal refused it: DecodeBundle would refuse the whole bundle.
func encodeBundle(msgs []*message.Message) ([]byte, error) {
	sizes := make([]int, len(msgs))
	total := 0
	for i, m := range msgs {
		if err := checkText(m); err != nil {
			return nil, fmt.Errorf("message %q: %w", m.UUID, err)
		}
		sizes[i] = envelopeSize(m)
		total += protowire.SizeTag(batchMessages) + protowire.SizeBytes(sizes[i])
	}
	b := make([]byte, 0, total)
	for i, m := range msgs {
		b = protowire.AppendTag(b, batchMessages, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(sizes[i]))
		if m.UUID != "" {
			b = protowire.AppendTag(b, envelopeUUID, protowire.BytesType)
			b = protowire.AppendString(b, m.UUID)
		}
		if len(m.Payload) > 0 {
			b = protowire.AppendTag(b, envelopePayload, protowire.BytesType)
			b = protowire.AppendBytes(b, m.Payload)
		}
		for k, v := range m.Metadata {
			b = protowire.AppendTag(b, envelopeMeta, protowire.BytesType)
			b = protowire.AppendString(b, k)
			b = protowire.AppendTag(b, envelopeMeta, protowire.BytesType)
			b = protowire.AppendString(b, v)
		}
	}
	return b, nil
}

// checkText refuses m if its id or a metadata key or value is not UTF-8.
func checkText(m *message.Message) error {
	if !utf8.ValidString(m.UUID) {
		return errNotUTF8
	}
	for k, v := range m.Metadata {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return fmt.Errorf("metadata %q: %w", k, errNotUTF8)
		}
	}
	return nil
}

// DecodeBundle reads the messages of a pb.Batch: each with its id,
// metadata (the flat list, or the map an older writer set when the list
// is empty; a trailing key without its value is dropped) and a copy of
// its payload. A body that is not a well-formed Batch, or whose text is
// not UTF-8 (which protobuf requires of strings), is an error.
func DecodeBundle(body []byte) ([]*message.Message, error) {
	var out []*message.Message
	for len(body) > 0 {
		num, typ, n := consumeTag(body)
		if n < 0 {
			return nil, fmt.Errorf("batch: %w", protowire.ParseError(n))
		}
		body = body[n:]
		if num != batchMessages || typ != protowire.BytesType {
			if n = protowire.ConsumeFieldValue(num, typ, body); n < 0 {
				return nil, fmt.Errorf("batch field %d: %w", num, protowire.ParseError(n))
			}
			body = body[n:]
			continue
		}
		if len(out) == MaxBundle {
			// Every writer stops at MaxBundle (the AMQP adapter's old
			// batches too): an empty envelope is 2 bytes that would cost a
			// message and, in job, a goroutine.
			return nil, fmt.Errorf("batch: more than %d envelopes", MaxBundle)
		}
		env, n := protowire.ConsumeBytes(body)
		if n < 0 {
			return nil, fmt.Errorf("batch envelope %d: %w", len(out), protowire.ParseError(n))
		}
		body = body[n:]
		m, err := decodeEnvelope(env)
		if err != nil {
			return nil, fmt.Errorf("batch envelope %d: %w", len(out), err)
		}
		out = append(out, m)
	}
	return out, nil
}

// decodeEnvelope reads one pb.Envelope. Its text (id, metadata keys and
// values) is gathered into one string, which the message's strings are
// parts of: an envelope's strings live and die with its message.
func decodeEnvelope(b []byte) (*message.Message, error) {
	var (
		id, payload []byte
		flatBuf     [16][]byte // a push carries 3–4 pairs
		mapBuf      [16][]byte
	)
	flat, old := flatBuf[:0], mapBuf[:0]
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		b = b[n:]
		if typ != protowire.BytesType || num < envelopeUUID || num > envelopeMeta {
			if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
				return nil, fmt.Errorf("field %d: %w", num, protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return nil, fmt.Errorf("field %d: %w", num, protowire.ParseError(n))
		}
		b = b[n:]
		if num != envelopePayload && num != envelopeMap && !utf8.Valid(v) {
			return nil, fmt.Errorf("field %d: %w", num, errNotUTF8)
		}
		switch num {
		case envelopeUUID:
			id = v
		case envelopePayload:
			payload = v
		case envelopeMeta:
			flat = append(flat, v)
		case envelopeMap:
			k, val, err := decodeMapEntry(v)
			if err != nil {
				return nil, fmt.Errorf("metadata entry: %w", err)
			}
			old = append(old, k, val)
		}
	}
	pairs := flat
	if len(flat) == 0 {
		pairs = old
	}
	pairs = pairs[:len(pairs)&^1]

	size := len(id)
	for _, p := range pairs {
		size += len(p)
	}
	var text strings.Builder
	text.Grow(size)
	text.Write(id)
	for _, p := range pairs {
		text.Write(p)
	}
	all := text.String()
	var body []byte
	if len(payload) > 0 {
		body = append([]byte(nil), payload...)
	}
	m := message.NewMessage(all[:len(id)], body)
	at := len(id)
	for i := 0; i < len(pairs); i += 2 {
		k := all[at : at+len(pairs[i])]
		at += len(k)
		v := all[at : at+len(pairs[i+1])]
		at += len(v)
		m.Metadata[k] = v
	}
	return m, nil
}

// decodeMapEntry reads one entry of a map<string, string>.
func decodeMapEntry(b []byte) (k, v []byte, err error) {
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return nil, nil, protowire.ParseError(n)
		}
		b = b[n:]
		if typ != protowire.BytesType || (num != mapEntryKey && num != mapEntryValue) {
			if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
				return nil, nil, protowire.ParseError(n)
			}
			b = b[n:]
			continue
		}
		f, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return nil, nil, protowire.ParseError(n)
		}
		b = b[n:]
		if !utf8.Valid(f) {
			return nil, nil, errNotUTF8
		}
		if num == mapEntryKey {
			k = f
		} else {
			v = f
		}
	}
	return k, v, nil
}
