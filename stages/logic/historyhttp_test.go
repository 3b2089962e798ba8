package logic

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// historyData is the data of a GET /im/history reply.
type historyData struct {
	Stream  string   `json:"stream"`
	Top     Position `json:"top"`
	Entries []struct {
		Pos       uint64  `json:"pos"`
		MsgID     string  `json:"msg_id"`
		Operation int32   `json:"operation"`
		At        string  `json:"at"`
		Msg       *string `json:"msg"`
		MsgBase64 []byte  `json:"msg_base64"`
	} `json:"entries"`
	More          bool   `json:"more"`
	Unrecoverable string `json:"unrecoverable"`
}

// TestHistoryRoute: GET /im/history returns a stream's messages after a
// position, in the envelope and with the status codes of the other
// routes; a position that cannot be served is a 200 naming why, with the
// top to resync from.
func TestHistoryRoute(t *testing.T) {
	h := newFakeHistory()
	a := newAPI(t, apiOptions{history: h})
	a.online(1, "k1")
	// live rooms keep 100 messages (the default): 105 pushes trim 5.
	for i := 1; i <= 105; i++ {
		if r := a.do("POST", "/im/push/room?operation=1001&type=live&room=1", "", fmt.Sprintf(`{"n":%d}`, i), nil); r.status != 200 {
			t.Fatalf("push %d: %d", i, r.status)
		}
	}
	for _, body := range []string{"text", "\xff\x00binary"} {
		if r := a.do("POST", "/im/push/mids?operation=1002&mids=1", "", body, nil); r.status != 200 {
			t.Fatalf("push to user 1: %d", r.status)
		}
	}
	const room = "stream=room:live://1"
	const roomEpoch = "&epoch=e-room_live___1"
	tests := []struct {
		name          string
		path          string
		status        int
		errField      string // named in a 400's message
		first, n      int    // first entry's position and the count
		more          bool
		unrecoverable string
	}{
		{name: "from the start", path: "/im/history?" + room, status: 200, first: 6, n: 100},
		{name: "after a position", path: "/im/history?" + room + roomEpoch + "&after=100", status: 200, first: 101, n: 5},
		{name: "a page", path: "/im/history?" + room + roomEpoch + "&after=10&limit=20", status: 200, first: 11, n: 20, more: true},
		{name: "at the top", path: "/im/history?" + room + roomEpoch + "&after=105", status: 200},
		{name: "goim", path: "/goim/history?" + room + roomEpoch + "&after=104", status: 200, first: 105, n: 1},
		{name: "trimmed", path: "/im/history?" + room + roomEpoch + "&after=2", status: 200, unrecoverable: "trimmed"},
		{name: "foreign epoch", path: "/im/history?" + room + "&epoch=other&after=3", status: 200, unrecoverable: "epoch"},
		{name: "future", path: "/im/history?" + room + roomEpoch + "&after=106", status: 200, unrecoverable: "future"},
		{name: "huge after", path: "/im/history?" + room + roomEpoch + "&after=9007199254740991", status: 200, unrecoverable: "future"},
		{name: "user stream", path: "/im/history?stream=user:1", status: 200, first: 1, n: 2},
		{name: "a stream never pushed to", path: "/im/history?stream=room:chat://9", status: 200},

		{name: "no stream", path: "/im/history", status: 400, errField: "stream"},
		{name: "empty stream", path: "/im/history?stream=", status: 400, errField: "stream"},
		{name: "unknown kind", path: "/im/history?stream=topic:x", status: 400, errField: "stream"},
		{name: "room without type", path: "/im/history?stream=room:1", status: 400, errField: "stream"},
		{name: "room with a control character", path: "/im/history?stream=room:live://%01", status: 400, errField: "stream"},
		{name: "room not UTF-8", path: "/im/history?stream=room:live://%FF", status: 400, errField: "stream"},
		{name: "room too long", path: "/im/history?stream=room:live://" + strings.Repeat("x", 300), status: 400, errField: "stream"},
		{name: "guest stream", path: "/im/history?stream=user:0", status: 400, errField: "stream"},
		{name: "negative user", path: "/im/history?stream=user:-1", status: 400, errField: "stream"},
		{name: "padded user", path: "/im/history?stream=user:01", status: 400, errField: "stream"},
		{name: "user past int64", path: "/im/history?stream=user:9223372036854775808", status: 400, errField: "stream"},
		{name: "stream twice", path: "/im/history?" + room + "&" + room, status: 400, errField: "stream"},
		{name: "after without epoch", path: "/im/history?" + room + "&after=3", status: 400, errField: "epoch"},
		{name: "negative after", path: "/im/history?" + room + roomEpoch + "&after=-1", status: 400, errField: "after"},
		{name: "after past uint64", path: "/im/history?" + room + roomEpoch + "&after=18446744073709551616", status: 400, errField: "after"},
		{name: "empty after", path: "/im/history?" + room + roomEpoch + "&after=", status: 400, errField: "after"},
		{name: "long epoch", path: "/im/history?" + room + "&epoch=" + strings.Repeat("e", 65), status: 400, errField: "epoch"},
		{name: "epoch past the wire's 32", path: "/im/history?" + room + "&after=1&epoch=" + strings.Repeat("e", 33), status: 400, errField: "epoch"},
		{name: "epoch with a punctuation mark", path: "/im/history?" + room + "&after=1&epoch=a!b", status: 400, errField: "epoch"},
		{name: "epoch not ASCII", path: "/im/history?" + room + "&after=1&epoch=%E2%98%83", status: 400, errField: "epoch"},
		{name: "after past 2^53-1", path: "/im/history?" + room + roomEpoch + "&after=9007199254740992", status: 400, errField: "after"},
		{name: "negative limit", path: "/im/history?" + room + "&limit=-1", status: 400, errField: "limit"},
		{name: "zero limit", path: "/im/history?" + room + "&limit=0", status: 400, errField: "limit"},
		{name: "limit over the cap", path: "/im/history?" + room + "&limit=1001", status: 400, errField: "limit"},
		{name: "bad query", path: "/im/history?" + room + ";x=1", status: 400, errField: "query"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := a.do("GET", tt.path, "", "", nil)
			if r.status != tt.status || r.Code != map[bool]int{true: 0, false: -tt.status}[tt.status == 200] {
				t.Fatalf("status %d code %d (%v), want %d", r.status, r.Code, deref(r.Msg), tt.status)
			}
			if tt.status != 200 {
				if !strings.HasPrefix(deref(r.Msg), tt.errField+":") {
					t.Fatalf("message %q does not name %s", deref(r.Msg), tt.errField)
				}
				return
			}
			var d historyData
			if err := json.Unmarshal(r.Data, &d); err != nil {
				t.Fatalf("data %s: %v", r.Data, err)
			}
			if d.Unrecoverable != tt.unrecoverable || d.More != tt.more || len(d.Entries) != tt.n {
				t.Fatalf("unrecoverable %q more %v entries %d; want %q %v %d", d.Unrecoverable, d.More, len(d.Entries), tt.unrecoverable, tt.more, tt.n)
			}
			if d.Top.Epoch != epochOf(d.Stream) || d.Top.Stream != d.Stream {
				t.Fatalf("top %+v is not the stream's", d.Top)
			}
			for i, e := range d.Entries {
				if e.Pos != uint64(tt.first+i) {
					t.Fatalf("entry %d at position %d, want %d", i, e.Pos, tt.first+i)
				}
			}
		})
	}

	t.Run("bodies", func(t *testing.T) {
		r := a.do("GET", "/im/history?"+room+roomEpoch+"&after=104", "", "", nil)
		var d historyData
		if err := json.Unmarshal(r.Data, &d); err != nil {
			t.Fatal(err)
		}
		if e := d.Entries[0]; e.Msg == nil || *e.Msg != `{"n":105}` || e.MsgBase64 != nil || e.Operation != 1001 || e.MsgID == "" || e.At == "" {
			t.Fatalf("room entry %+v, want the text message of operation 1001 with its id and time", e)
		}
		r = a.do("GET", "/im/history?stream=user:1", "", "", nil)
		if err := json.Unmarshal(r.Data, &d); err != nil {
			t.Fatal(err)
		}
		if e := d.Entries[0]; e.Msg == nil || *e.Msg != "text" || e.MsgBase64 != nil {
			t.Fatalf("text entry %+v, want msg", e)
		}
		if e := d.Entries[1]; e.Msg != nil || string(e.MsgBase64) != "\xff\x00binary" {
			t.Fatalf("binary entry %+v, want msg_base64 only", e)
		}
		if d.Top.Pos != 2 || d.More {
			t.Fatalf("user stream top %+v more %v, want 2 and no more", d.Top, d.More)
		}
	})
	t.Run("store down", func(t *testing.T) {
		h.setFail(errors.New("connection refused"))
		defer h.setFail(nil)
		r := a.do("GET", "/im/history?"+room, "", "", nil)
		if r.status != 503 || r.Code != -503 || r.header.Get("Retry-After") == "" {
			t.Fatalf("status %d Retry-After %q, want 503 with Retry-After", r.status, r.header.Get("Retry-After"))
		}
	})
	t.Run("wrong method", func(t *testing.T) {
		if r := a.do("POST", "/im/history?"+room, "", "", nil); r.status != 405 || r.header.Get("Allow") == "" {
			t.Fatalf("POST: status %d Allow %q, want 405", r.status, r.header.Get("Allow"))
		}
	})
}

// TestHistoryRouteNeedsTheAPIKeyAndAStore: the route is behind the API
// key like every other, and a logic without a history store says so
// (501), never 503: retrying would not help.
func TestHistoryRouteNeedsTheAPIKeyAndAStore(t *testing.T) {
	keyed := newAPI(t, apiOptions{history: newFakeHistory(), apiKeys: []string{"0123456789abcdef-key"}})
	if r := keyed.do("GET", "/im/history?stream=user:1", "", "", nil); r.status != 401 {
		t.Fatalf("without the key: %d, want 401", r.status)
	}
	none := newAPI(t, apiOptions{})
	if r := none.do("GET", "/im/history?stream=user:1", "", "", nil); r.status != 501 || r.header.Get("Retry-After") != "" {
		t.Fatalf("without a history store: %d, want 501 without Retry-After", r.status)
	}
	// Input is still checked first.
	if r := none.do("GET", "/im/history?stream=nope", "", "", nil); r.status != 400 {
		t.Fatalf("a bad stream without a store: %d, want 400", r.status)
	}
}
