package job

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"imcloud/pipeline"
	"imcloud/proto/pb"
)

// fakeCloud records the room calls it gets.
type fakeCloud struct {
	pb.UnimplementedCloudServer
	mu    sync.Mutex
	calls [][]string // bodies per BroadcastRoom call
}

func (f *fakeCloud) BroadcastRoom(_ context.Context, req *pb.BroadcastRoomReq) (*pb.BroadcastRoomReply, error) {
	var bodies []string
	if req.Proto != nil {
		bodies = append(bodies, string(req.Proto.Body))
	}
	for _, p := range req.Batch {
		bodies = append(bodies, string(p.Body))
	}
	f.mu.Lock()
	f.calls = append(f.calls, bodies)
	f.mu.Unlock()
	return &pb.BroadcastRoomReply{}, nil
}

func (f *fakeCloud) callSizes() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	var n []int
	for _, c := range f.calls {
		n = append(n, len(c))
	}
	return n
}

func startFakeCloud(t *testing.T) (*fakeCloud, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeCloud{}
	srv := grpc.NewServer()
	pb.RegisterCloudServer(srv, f)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return f, ln.Addr().String()
}

// handleAll hands n room messages to the stage at once and waits for all.
func handleAll(t *testing.T, s *Stage, room string, n int) {
	t.Helper()
	var wg sync.WaitGroup
	for i := range n {
		msg, err := pipeline.NewPushMessage(fmt.Sprint("m", i), "c", &pb.PushMsg{Type: pb.PushMsg_ROOM, Operation: 1000, Room: room, Msg: fmt.Appendf(nil, "%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		msg.SetContext(ctx)
		wg.Go(func() {
			defer cancel()
			if err := s.Handle(msg); err != nil {
				t.Error(err)
			}
			if msg.Metadata.Get(pipeline.MetaDeliveredNodes) == "" {
				t.Errorf("message %s does not record the node it reached", msg.UUID)
			}
		})
	}
	wg.Wait()
}

func TestRoomBatching(t *testing.T) {
	tests := []struct {
		name     string
		window   time.Duration
		size     int
		messages int
		want     [][]int // the batch sizes the cloud node may receive
	}{
		{"full batch goes at once", time.Minute, 5, 5, [][]int{{5}}},
		{"window closes a partial batch", 100 * time.Millisecond, 10, 3, [][]int{{3}}},
		// Batches go through the room's queue to the node: a second that
		// fills while the first is out waits for it; one that fills
		// before the first went out joins its call.
		{"overflow starts a new batch", time.Minute, 4, 8, [][]int{{4, 4}, {8}}},
		// Without a window, what arrives while a call is out goes in the
		// next: how they group depends on when each arrives.
		{"window 0 sends what waits together", 0, 10, 3, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cloud, addr := startFakeCloud(t)
			s := New(Options{Nodes: StaticNodes{addr}, Logger: slog.New(slog.DiscardHandler), BatchWindow: tt.window, BatchSize: tt.size, Timeout: 5 * time.Second})
			t.Cleanup(func() { _ = s.Close() })
			handleAll(t, s, "live://1", tt.messages)
			got := cloud.callSizes()
			if tt.want == nil {
				sum := 0
				for _, n := range got {
					sum += n
				}
				if sum != tt.messages || slices.Max(got) > tt.size {
					t.Fatalf("cloud got batches of %v, want %d messages in batches of at most %d", got, tt.messages, tt.size)
				}
				return
			}
			if !slices.ContainsFunc(tt.want, func(w []int) bool { return slices.Equal(got, w) }) {
				t.Fatalf("cloud got batches of %v, want one of %v", got, tt.want)
			}
		})
	}
}

// reportedNodes lists nodes as a registry does.
type reportedNodes []*pb.NodeInfo

func (r reportedNodes) Nodes(context.Context) ([]*pb.NodeInfo, error) { return r, nil }

func TestRoomPushesGoOnlyToNodesHostingTheRoom(t *testing.T) {
	host, hostAddr := startFakeCloud(t)
	other, otherAddr := startFakeCloud(t)
	unknown, unknownAddr := startFakeCloud(t)
	nodes := reportedNodes{
		{Id: "host", GrpcAddr: hostAddr, ReportsRooms: true, RoomCount: map[string]int32{"live://1": 2}},
		{Id: "other", GrpcAddr: otherAddr, ReportsRooms: true, RoomCount: map[string]int32{"live://2": 1}},
		{Id: "static", GrpcAddr: unknownAddr}, // reports nothing: gets every room push
	}
	s := New(Options{Nodes: nodes, Logger: slog.New(slog.DiscardHandler), Timeout: 5 * time.Second})
	t.Cleanup(func() { _ = s.Close() })
	handleAll(t, s, "live://1", 1)
	if got := fmt.Sprint(len(host.callSizes()), len(other.callSizes()), len(unknown.callSizes())); got != "1 0 1" {
		t.Fatalf("calls to host, other, static node: %s, want 1 0 1", got)
	}
}
