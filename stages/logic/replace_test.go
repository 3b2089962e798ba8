package logic

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"

	"imcloud/adapters/memory"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
	"imcloud/stages/internal/cloudconn"
	"imcloud/stages/logic/token"
)

// closeRecorder is a cloud node that records the Close calls it gets.
type closeRecorder struct {
	pb.UnimplementedCloudServer
	got chan *pb.CloseReq
}

func (c *closeRecorder) Close(_ context.Context, req *pb.CloseReq) (*pb.CloseReply, error) {
	c.got <- req
	return &pb.CloseReply{}, nil
}

// TestReplacedConnectionIsNamed: a key moving to another node closes the
// connection it had on the first one by its id, not whatever connection
// holds the key there when the call lands (a newer one, if the client
// reconnected there too: both then closed, and the key stayed offline).
func TestReplacedConnectionIsNamed(t *testing.T) {
	rec := &closeRecorder{got: make(chan *pb.CloseReq, 4)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	pb.RegisterCloudServer(srv, rec)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)

	reg := memory.New(time.Minute, time.Minute)
	if _, err := reg.RenewNode(context.Background(), &pb.NodeInfo{Id: "n1", GrpcAddr: ln.Addr().String()}); err != nil {
		t.Fatal(err)
	}
	auth, err := token.NewAuthenticator(config.Auth{Mode: config.AuthInsecureJSON})
	if err != nil {
		t.Fatal(err)
	}
	r := &replacer{registry: reg, logger: slog.New(slog.DiscardHandler), clouds: cloudconn.New()}
	t.Cleanup(func() { _ = r.Close() })
	s := newGRPCServer(config.Default().Logic, auth, reg, r, slog.New(slog.DiscardHandler))
	connect := func(server string, conn uint64) {
		t.Helper()
		if _, err := s.Connect(context.Background(), &pb.ConnectReq{Server: server, RemoteAddr: "1.2.3.4:5", Conn: conn,
			Token: fmt.Appendf(nil, `{"mid":1,"key":"roamer"}`)}); err != nil {
			t.Fatal(err)
		}
	}
	connect("n1", 5)
	connect("n2", 9)
	select {
	case req := <-rec.got:
		if req.Key != "roamer" || req.Conn != 5 {
			t.Fatalf("Close on n1 for key %q conn %d, want roamer conn 5", req.Key, req.Conn)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the replaced connection on n1 was not closed")
	}
}
