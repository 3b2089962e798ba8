package cloud

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/gorilla/websocket"

	"imcloud/proto/wire"
)

// wsPair returns the server side of a real WebSocket connection and the
// client side reading from it.
func wsPair(t *testing.T) (*wsTransport, *websocket.Conn) {
	t.Helper()
	srvConn := make(chan *websocket.Conn, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := upgrader(nil).Upgrade(w, r, nil)
		if err != nil {
			t.Error(err)
			return
		}
		srvConn <- c
	}))
	t.Cleanup(srv.Close)
	cli, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return &wsTransport{conn: <-srvConn, maxBody: wire.DefaultMaxBody, bufs: newBufPool()}, cli
}

func TestWebSocketWriteBatchesIntoOneOp9Frame(t *testing.T) {
	tr, cli := wsPair(t)
	shared := wire.Encode(1000, 0, []byte("room msg"))
	batch := []outItem{
		{pkt: shared, push: true},
		{pkt: wire.Encode(wire.OpHeartbeatReply, 77, []byte{0, 0, 0, 1})},
		{pkt: shared, push: true},
	}
	var seq atomic.Int32
	if err := tr.Write(batch, &seq); err != nil {
		t.Fatal(err)
	}
	if err := tr.Write(batch[:1], &seq); err != nil {
		t.Fatal(err)
	}

	_, frame, err := cli.ReadMessage()
	if err != nil {
		t.Fatal(err)
	}
	outer, n, err := wire.Decode(frame, 1<<20)
	if err != nil || n != len(frame) || outer.Op != wire.OpRaw {
		t.Fatalf("first frame: op %d, %d of %d bytes, err %v; want one op 9 packet", outer.Op, n, len(frame), err)
	}
	inner, err := wire.DecodeAll(outer.Body, wire.DefaultMaxBody)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct{ op, seq int32 }{{1000, 1}, {wire.OpHeartbeatReply, 77}, {1000, 2}}
	if len(inner) != len(want) {
		t.Fatalf("op 9 carries %d packets, want %d", len(inner), len(want))
	}
	for i, w := range want {
		if inner[i].Op != w.op || inner[i].Seq != w.seq {
			t.Errorf("packet %d: op %d seq %d, want op %d seq %d", i, inner[i].Op, inner[i].Seq, w.op, w.seq)
		}
	}
	_, single, err := cli.ReadMessage()
	if err != nil {
		t.Fatal(err)
	}
	p, _, err := wire.Decode(single, wire.DefaultMaxBody)
	if err != nil || p.Op != 1000 || p.Seq != 3 {
		t.Fatalf("single frame: %+v %v, want op 1000 seq 3", p, err)
	}
	// Sequence numbers were written into copies: the shared bytes are untouched.
	if sp, _, _ := wire.Decode(shared, wire.DefaultMaxBody); sp.Seq != 0 {
		t.Fatalf("shared packet's seq changed to %d", sp.Seq)
	}
}
