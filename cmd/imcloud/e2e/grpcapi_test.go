package e2e

import (
	"context"
	"fmt"
	"net/url"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"imcloud/proto/client"
	"imcloud/proto/pb"
	"imcloud/stages/logic/token"
)

// apiClient dials the gRPC push API of h.
func (h *harness) apiClient() pb.PushServiceClient {
	h.t.Helper()
	conn, err := grpc.NewClient(h.addrs.APIGRPC, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = conn.Close() })
	return pb.NewPushServiceClient(conn)
}

func apiCtx(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+testAPIKey)
}

// readInOrder reads n packets from c and returns their bodies in order.
func readInOrder(t *testing.T, name string, c *client.Conn, n int) []string {
	t.Helper()
	out := readInOrderQuiet(c, n)
	if len(out) < n {
		t.Fatalf("%s: read %d of %d", name, len(out), n)
	}
	return out
}

// TestGRPCPushAPI drives the push API over gRPC through every stage: a
// unary push reaches its client, a wrong key is refused, and a stream of
// 3,000 pushes to a room reaches its member in order, each acknowledged
// with its id.
func TestGRPCPushAPI(t *testing.T) {
	h := start(t, "logic.api_grpc_addr=127.0.0.1:0", "logic.api_stream_window=64")
	room := uniq("g")
	a := h.connect("ws", token.Claims{Mid: 1, Key: "ka", Rooms: []string{"live://" + room}})
	api := h.apiClient()
	ctx, cancel := context.WithTimeout(context.Background(), 2*wait)
	defer cancel()

	if _, err := api.Push(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer wrong"),
		&pb.PushRequest{Operation: 1000, Msg: []byte("no"), Target: &pb.PushRequest_Keys{Keys: &pb.Keys{Keys: []string{"ka"}}}}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("wrong key: %v", err)
	}
	reply, err := api.Push(apiCtx(ctx), &pb.PushRequest{Operation: 1000, Msg: []byte("unary"), Target: &pb.PushRequest_Keys{Keys: &pb.Keys{Keys: []string{"ka"}}}})
	if err != nil || reply.Online != 1 {
		t.Fatalf("unary push: %v %v", reply, err)
	}
	expect(t, "A", a, 1000, "unary")

	s, err := api.PushStream(apiCtx(ctx))
	if err != nil {
		t.Fatal(err)
	}
	const n = 3000
	go func() {
		for i := range n {
			push := &pb.PushRequest{Operation: 1000, Msg: []byte(strconv.Itoa(i)), Target: &pb.PushRequest_Room{Room: &pb.Room{Type: "live", Room: room}}}
			if err := s.Send(&pb.StreamPush{Id: uint64(i), Push: push}); err != nil {
				return
			}
		}
		_ = s.CloseSend()
	}()
	acked := make([]bool, n)
	for range n {
		r, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.Result.Code != 0 || acked[r.Id] {
			t.Fatalf("result %v (twice: %v)", r, acked[r.Id])
		}
		acked[r.Id] = true
	}
	got := readInOrder(t, "A", a, n)
	for i, b := range got {
		if b != strconv.Itoa(i) {
			t.Fatalf("message %d is %q: out of order", i, b)
		}
	}
}

// TestGRPCPushStreamFlowControl: a producer that sends without reading
// its results is held: the server stops reading its pushes once their
// results back up, so only part of what it sent is accepted (a fence
// pushed over HTTP after it shows how much); once it reads, every push is
// acknowledged and delivered.
func TestGRPCPushStreamFlowControl(t *testing.T) {
	h := start(t, "logic.api_grpc_addr=127.0.0.1:0", "logic.api_stream_window=32")
	room := uniq("fc")
	a := h.connect("ws", token.Claims{Mid: 1, Key: "ka", Rooms: []string{"live://" + room}})
	api := h.apiClient()
	ctx, cancel := context.WithTimeout(context.Background(), 4*wait)
	defer cancel()
	s, err := api.PushStream(apiCtx(ctx))
	if err != nil {
		t.Fatal(err)
	}
	const n = 20000
	sent := make(chan int, 1)
	go func() {
		i := 0
		defer func() { sent <- i }()
		for ; i < n; i++ {
			push := &pb.PushRequest{Operation: 1000, Msg: []byte(strconv.Itoa(i)), Target: &pb.PushRequest_Room{Room: &pb.Room{Type: "live", Room: room}}}
			if err := s.Send(&pb.StreamPush{Id: uint64(i), Push: push}); err != nil {
				return
			}
		}
		_ = s.CloseSend()
	}()
	// The first push arrives; then wait until the pushes the server took
	// are delivered and nothing more comes: the count of deliveries does
	// not move across three fences in a row.
	if b := readInOrder(t, "A", a, 1)[0]; b != "0" {
		t.Fatalf("first delivery %q", b)
	}
	accepted, still := 1, 0
	for still < 3 {
		fence := uniq("fence")
		h.push(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {"live"}, "room": {room}}, body: fence})
		before := accepted
		for {
			b := readInOrder(t, "A", a, 1)[0]
			if b == fence {
				break
			}
			if b != strconv.Itoa(accepted) {
				t.Fatalf("delivery %d is %q", accepted, b)
			}
			accepted++
		}
		if accepted == before {
			still++
		} else {
			still = 0
		}
	}
	if accepted >= n/2 {
		t.Fatalf("%d of %d pushes accepted with no result read: the stream is not flow-controlled", accepted, n)
	}
	t.Logf("held at %d of %d pushes accepted while no result was read", accepted, n)
	// The rest arrive while the results are read: a client that read
	// nothing until every result was in would be closed as a slow
	// consumer (4008).
	rest := make(chan []string, 1)
	go func() { rest <- readInOrderQuiet(a, n-accepted) }()
	for i := range n {
		r, err := s.Recv()
		if err != nil {
			t.Fatalf("result %d: %v", i, err)
		}
		if r.Result.Code != 0 || r.Id != uint64(i) {
			t.Fatalf("result %d: %v", i, r)
		}
	}
	if got := <-sent; got != n {
		t.Fatalf("sent %d", got)
	}
	got := <-rest
	if len(got) != n-accepted {
		t.Fatalf("%d deliveries after the hold, want %d", len(got), n-accepted)
	}
	for i, b := range got {
		if b != fmt.Sprint(accepted+i) {
			t.Fatalf("delivery %d is %q", accepted+i, b)
		}
	}
}

// readInOrderQuiet reads up to n packets from c for a goroutine that
// cannot fail the test: it returns what it read before an error.
func readInOrderQuiet(c *client.Conn, n int) []string {
	out := make([]string, 0, n)
	for range n {
		_ = c.SetReadDeadline(time.Now().Add(wait))
		p, err := c.Read()
		if err != nil {
			return out
		}
		out = append(out, string(p.Body))
	}
	return out
}
