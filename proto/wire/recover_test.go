package wire

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestDecodeRecoverRequest(t *testing.T) {
	tests := []struct {
		name string
		body string
		want []StreamPos
	}{
		{"empty list", `{"streams":[]}`, []StreamPos{}},
		{"room and user", `{"streams":[{"stream":"room:live://1","epoch":"0123456789abcdef","pos":17},{"pos":0,"epoch":"e","stream":"user:42"}]}`,
			[]StreamPos{{"room:live://1", "0123456789abcdef", 17}, {"user:42", "e", 0}}},
		{"white space", " {\n\"streams\" : [ { \"stream\":\"user:1\", \"epoch\":\"e\", \"pos\":9007199254740991 } ] }\n", []StreamPos{{"user:1", "e", MaxPos}}},
		{"escaped room", `{"streams":[{"stream":"room:chat://caf\u00e9","epoch":"e","pos":1}]}`, []StreamPos{{"room:chat://café", "e", 1}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeRecoverRequest([]byte(tt.body))
			if err != nil || !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("DecodeRecoverRequest = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func entries(n int, stream func(i int) string) string {
	var b strings.Builder
	b.WriteString(`{"streams":[`)
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"stream":%q,"epoch":"e","pos":%d}`, stream(i), i)
	}
	b.WriteString(`]}`)
	return b.String()
}

func TestDecodeRecoverRequestAbuse(t *testing.T) {
	entry := `{"stream":"user:1","epoch":"e","pos":1}`
	list := func(es ...string) string { return `{"streams":[` + strings.Join(es, ",") + `]}` }
	tests := []struct {
		name string
		body string
	}{
		{"empty", ``},
		{"null", `null`},
		{"a list", `[]`},
		{"empty object", `{}`},
		{"truncated", list(entry)[:30]},
		{"unclosed", `{"streams":[`},
		{"streams twice", `{"streams":[],"streams":[` + entry + `]}`},
		{"streams in other case", `{"Streams":[]}`},
		{"unknown member", `{"streams":[],"more":1}`},
		{"streams null", `{"streams":null}`},
		{"streams an object", `{"streams":{}}`},
		{"entry not an object", list(`"user:1"`)},
		{"entry null", list(`null`)},
		{"unknown entry member", list(`{"stream":"user:1","epoch":"e","pos":1,"x":1}`)},
		{"entry member in other case", list(`{"Stream":"user:1","epoch":"e","pos":1}`)},
		{"member twice", list(`{"stream":"user:1","stream":"user:2","epoch":"e","pos":1}`)},
		{"no pos", list(`{"stream":"user:1","epoch":"e"}`)},
		{"no epoch", list(`{"stream":"user:1","pos":1}`)},
		{"no stream", list(`{"epoch":"e","pos":1}`)},
		{"duplicate stream", list(entry, entry)},
		{"duplicate stream by escape", list(entry, `{"stream":"user:\u0031","epoch":"f","pos":2}`)},
		{"too many streams", entries(MaxRecoverStreams+1, func(i int) string { return fmt.Sprintf("room:r://%d", i) })},
		{"too many bytes", `{"streams":[]}` + strings.Repeat(" ", MaxRecoverBytes)},
		{"data after the object", `{"streams":[]}{}`},
		{"garbage after the object", `{"streams":[]}x`},
		{"not UTF-8", list(`{"stream":"room:a://` + "\xff" + `","epoch":"e","pos":1}`)},
		{"not UTF-8 outside strings", "{\"streams\":[]}\xff"},
		{"control character", list(`{"stream":"room:a://\u0000","epoch":"e","pos":1}`)},
		{"invalid room", list(`{"stream":"room:nope","epoch":"e","pos":1}`)},
		{"room pattern", list(`{"stream":"room:live://*","epoch":"e","pos":1}`)},
		{"room too long", list(`{"stream":"room:a://` + strings.Repeat("b", MaxRoomLen) + `","epoch":"e","pos":1}`)},
		{"unknown stream class", list(`{"stream":"topic:x","epoch":"e","pos":1}`)},
		{"user of mid 0", list(`{"stream":"user:0","epoch":"e","pos":1}`)},
		{"user with a sign", list(`{"stream":"user:+1","epoch":"e","pos":1}`)},
		{"user past int64", list(`{"stream":"user:99999999999999999999","epoch":"e","pos":1}`)},
		{"stream a number", list(`{"stream":1,"epoch":"e","pos":1}`)},
		{"empty epoch", list(`{"stream":"user:1","epoch":"","pos":1}`)},
		{"epoch too long", list(`{"stream":"user:1","epoch":"` + strings.Repeat("e", MaxEpochLen+1) + `","pos":1}`)},
		{"epoch with a quote", list(`{"stream":"user:1","epoch":"e\"","pos":1}`)},
		{"epoch a number", list(`{"stream":"user:1","epoch":7,"pos":1}`)},
		{"negative pos", list(`{"stream":"user:1","epoch":"e","pos":-1}`)},
		{"fractional pos", list(`{"stream":"user:1","epoch":"e","pos":1.5}`)},
		{"exponent pos", list(`{"stream":"user:1","epoch":"e","pos":1e3}`)},
		{"pos past MaxPos", list(`{"stream":"user:1","epoch":"e","pos":9007199254740992}`)},
		{"pos past uint64", list(`{"stream":"user:1","epoch":"e","pos":18446744073709551616}`)},
		{"pos a string", list(`{"stream":"user:1","epoch":"e","pos":"1"}`)},
		{"pos null", list(`{"stream":"user:1","epoch":"e","pos":null}`)},
		{"pos nested", list(`{"stream":"user:1","epoch":"e","pos":[1]}`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, err := DecodeRecoverRequest([]byte(tt.body)); !errors.Is(err, ErrRecover) {
				t.Fatalf("DecodeRecoverRequest = %+v, %v; want ErrRecover", got, err)
			}
		})
	}
}

// The most a request may hold decodes, and with the default packet limit
// a request for the default 16 rooms of the longest names and the user
// stream still fits one packet.
func TestRecoverRequestAtItsLimits(t *testing.T) {
	long := func(i int) string {
		return fmt.Sprintf("room:%s://%03d", strings.Repeat("t", MaxRoomLen-6), i)
	}
	body := entries(MaxRecoverStreams, long)
	if got, err := DecodeRecoverRequest([]byte(body)); err != nil || len(got) != MaxRecoverStreams {
		t.Fatalf("%d streams: %d decoded, %v", MaxRecoverStreams, len(got), err)
	}
	streams := []StreamPos{{Stream: "user:9223372036854775807", Epoch: strings.Repeat("e", MaxEpochLen), Pos: MaxPos}}
	for i := range 16 {
		streams = append(streams, StreamPos{Stream: long(i), Epoch: strings.Repeat("e", MaxEpochLen), Pos: MaxPos})
	}
	b, err := AppendRecoverRequest(nil, streams)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > DefaultMaxBody {
		t.Fatalf("16 rooms and the user stream take %d bytes, over the default body limit %d", len(b), DefaultMaxBody)
	}
	got, err := DecodeRecoverRequest(b)
	if err != nil || !reflect.DeepEqual(got, streams) {
		t.Fatalf("round trip: %v", err)
	}
}

func TestRecoverReplyRoundTrip(t *testing.T) {
	results := []RecoverResult{
		{Stream: "room:live://1", Recovered: true, Epoch: "e1", Pos: 117},
		{Stream: "user:42", Recovered: false, Reason: ReasonTrimmed, Epoch: "e2", Pos: 9},
		{Stream: `room:quote://"\`, Reason: ReasonForbidden},
	}
	b, err := AppendRecoverReply([]byte("x"), results)
	if err != nil {
		t.Fatal(err)
	}
	if b[0] != 'x' {
		t.Fatal("dst overwritten")
	}
	want := `x{"streams":[{"stream":"room:live://1","recovered":true,"epoch":"e1","pos":117},{"stream":"user:42","recovered":false,"reason":"trimmed","epoch":"e2","pos":9},{"stream":"room:quote://\"\\","recovered":false,"reason":"forbidden","epoch":"","pos":0}]}`
	if string(b) != want {
		t.Fatalf("reply\n%s\nwant\n%s", b, want)
	}
	got, err := DecodeRecoverReply(b[1:])
	if err != nil || !reflect.DeepEqual(got.Streams, results) {
		t.Fatalf("DecodeRecoverReply = %+v, %v", got, err)
	}
	// A newer server's extra members are skipped by the client.
	if _, err := DecodeRecoverReply([]byte(`{"streams":[{"stream":"user:1","epoch":"e","pos":1,"recovered":true,"new":1}],"also":2}`)); err != nil {
		t.Fatalf("extra members: %v", err)
	}
	for _, bad := range []string{``, `{"streams":[{"recovered":true}]}`, `{"streams":1}`} {
		if _, err := DecodeRecoverReply([]byte(bad)); err == nil {
			t.Errorf("DecodeRecoverReply(%q) accepted", bad)
		}
	}
	if b, err := AppendRecoverReply(nil, nil); err != nil || string(b) != `{"streams":[]}` {
		t.Fatalf("no results: %s, %v", b, err)
	}
}

func FuzzDecodeRecoverRequest(f *testing.F) {
	f.Add([]byte(`{"streams":[{"stream":"room:live://1","epoch":"0123456789abcdef","pos":17},{"stream":"user:42","epoch":"e","pos":0}]}`))
	f.Add([]byte(`{"streams":[]}`))
	f.Add([]byte(`{"streams":[{"stream":"user:1","stream":"user:2","epoch":"e","pos":1}]}`))
	f.Add([]byte(`{"streams":[{"stream":"room:a://\u00e9","epoch":"e","pos":1e3}]}`))
	f.Add([]byte("{\"streams\":[]}\xff"))
	f.Fuzz(func(t *testing.T, b []byte) {
		streams, err := DecodeRecoverRequest(b)
		if err != nil {
			if !errors.Is(err, ErrRecover) {
				t.Fatalf("error %v does not wrap ErrRecover", err)
			}
			return
		}
		if len(streams) > MaxRecoverStreams {
			t.Fatalf("%d streams decoded", len(streams))
		}
		for _, s := range streams {
			if ValidStream(s.Stream) != nil || ValidEpoch(s.Epoch) != nil || s.Pos > MaxPos {
				t.Fatalf("invalid entry decoded: %+v", s)
			}
		}
		// What decodes survives the client's encoding unchanged.
		enc, err := AppendRecoverRequest(nil, streams)
		if err != nil {
			t.Fatal(err)
		}
		again, err := DecodeRecoverRequest(enc)
		if err != nil || !reflect.DeepEqual(again, streams) {
			t.Fatalf("re-decoding %s: %+v, %v", enc, again, err)
		}
	})
}
