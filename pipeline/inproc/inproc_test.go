package inproc

import (
	"context"
	"errors"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/proto/pb"
)

// logic is a Logic server whose Connect does what each case needs.
type logic struct {
	pb.UnimplementedLogicServer
	connect func(context.Context, *pb.ConnectReq) (*pb.ConnectReply, error)
}

func (l *logic) Connect(ctx context.Context, req *pb.ConnectReq) (*pb.ConnectReply, error) {
	return l.connect(ctx, req)
}

func client(l *logic) pb.LogicClient {
	c := New()
	pb.RegisterLogicServer(c, l)
	return pb.NewLogicClient(c)
}

// TestCallCopiesMessages: the handler gets its own request and the caller
// its own reply, as after encoding: what either side changes later the
// other does not see.
func TestCallCopiesMessages(t *testing.T) {
	kept := &pb.ConnectReply{Key: "k", Rooms: []string{"live://1"}}
	var got *pb.ConnectReq
	c := client(&logic{connect: func(ctx context.Context, req *pb.ConnectReq) (*pb.ConnectReply, error) {
		got = req
		return kept, nil
	}})
	req := &pb.ConnectReq{Server: "node-1", Token: []byte("t")}
	reply, err := c.Connect(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if reply.Key != "k" || len(reply.Rooms) != 1 || reply.Rooms[0] != "live://1" {
		t.Fatalf("reply %v", reply)
	}
	if got == req || got.Server != "node-1" || string(got.Token) != "t" {
		t.Fatalf("handler got %p %v, caller sent %p", got, got, req)
	}
	reply.Rooms[0] = "changed"
	req.Token[0] = 'X' // a caller's buffer, reused
	if kept.Rooms[0] != "live://1" || string(got.Token) != "t" {
		t.Fatalf("a change on one side reached the other: server's reply %v, its request %v", kept, got)
	}
}

// TestCallErrors: errors reach the caller as a remote server's would.
func TestCallErrors(t *testing.T) {
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		err  error
		want codes.Code
	}{
		{"a status as it is", context.Background(), status.Error(codes.Unauthenticated, "invalid token"), codes.Unauthenticated},
		{"a plain error as Unknown", context.Background(), errors.New("boom"), codes.Unknown},
		{"the context's deadline", context.Background(), context.DeadlineExceeded, codes.DeadlineExceeded},
		{"a call whose context ended is not made", cancelled, nil, codes.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			called := false
			c := client(&logic{connect: func(context.Context, *pb.ConnectReq) (*pb.ConnectReply, error) {
				called = true
				return nil, tc.err
			}})
			_, err := c.Connect(tc.ctx, &pb.ConnectReq{})
			if status.Code(err) != tc.want {
				t.Fatalf("error %v (%v), want %v", err, status.Code(err), tc.want)
			}
			if tc.ctx.Err() != nil && called {
				t.Fatal("the handler ran for a call whose context had ended")
			}
		})
	}
}

// TestUnservedCalls: a method nobody registered, or a stream, is
// Unimplemented; registering a service with streams panics, as a
// grpc.Server does with what it cannot serve.
func TestUnservedCalls(t *testing.T) {
	c := New()
	if err := c.Invoke(context.Background(), "/imcloud.Logic/Connect", &pb.ConnectReq{}, &pb.ConnectReply{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("unregistered method: %v", err)
	}
	if _, err := c.NewStream(context.Background(), &grpc.StreamDesc{}, "/x/y"); status.Code(err) != codes.Unimplemented {
		t.Fatalf("stream: %v", err)
	}
	// The Logic service's own Unimplemented methods answer as they would remotely.
	if _, err := client(&logic{}).Tops(context.Background(), &pb.TopsReq{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("unimplemented method: %v", err)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a service with streams was registered")
		}
	}()
	pb.RegisterPushServiceServer(c, pb.UnimplementedPushServiceServer{})
}
