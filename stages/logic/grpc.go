package logic

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// grpcServer serves the Logic service cloud nodes call.
type grpcServer struct {
	pb.UnimplementedLogicServer
	auth     Authenticator
	registry Registry
	replacer *replacer
	logger   *slog.Logger
	// sessionTTL is told to cloud nodes, which forward heartbeats at most
	// a few times per period.
	sessionTTL time.Duration
}

// invalid answers a request carrying a string the wire does not accept:
// a cloud node must not poison the registry (an invalid room in one
// node's RoomCount once made every RenewOnline of that node fail).
func invalid(what string, err error) error {
	return status.Errorf(codes.InvalidArgument, "%s: %v", what, err)
}

// validSession checks the identifiers of a session call from a cloud node.
func validSession(key, server string) error {
	if err := wire.ValidKey(key); err != nil {
		return invalid("key", err)
	}
	if err := validServer(server); err != nil {
		return err
	}
	return nil
}

func validServer(server string) error {
	if server == "" {
		return status.Error(codes.InvalidArgument, "server is required")
	}
	if err := wire.ValidText(server, wire.MaxTextLen); err != nil {
		return invalid("server", err)
	}
	return nil
}

// validNode checks every string a cloud node reports about itself.
func validNode(n *pb.NodeInfo) error {
	if n.GetId() == "" || n.GetGrpcAddr() == "" {
		return status.Error(codes.InvalidArgument, "node id and grpc_addr are required")
	}
	for what, v := range map[string]string{"node id": n.Id, "grpc_addr": n.GrpcAddr, "host": n.Host} {
		if err := wire.ValidText(v, wire.MaxTextLen); err != nil {
			return invalid(what, err)
		}
	}
	// Rooms are checked for what the registry, logs and protobuf need,
	// not for the type://id form clients are held to now: a cloud node of
	// an older version may still host such a room, and refusing its whole
	// report would drop the node.
	for room := range n.RoomCount {
		if room == "" {
			return status.Error(codes.InvalidArgument, "room_count: empty room")
		}
		if err := wire.ValidText(room, wire.MaxRoomLen); err != nil {
			return invalid("room_count", err)
		}
	}
	return nil
}

func (s *grpcServer) Connect(ctx context.Context, req *pb.ConnectReq) (*pb.ConnectReply, error) {
	if err := validServer(req.Server); err != nil {
		return nil, err
	}
	if err := wire.ValidText(req.RemoteAddr, wire.MaxTextLen); err != nil {
		return nil, invalid("remote_addr", err)
	}
	id, err := s.auth.Authenticate(req.Token)
	if err != nil {
		s.logger.InfoContext(ctx, "client auth rejected", "server", req.Server, "remote", req.RemoteAddr, "err", err)
		if errors.Is(err, ErrUnauthenticated) {
			return nil, status.Error(codes.Unauthenticated, "invalid token")
		}
		return nil, status.Error(codes.Internal, "authenticate")
	}
	prev, err := s.registry.AddSession(ctx, id.Mid, id.Key, req.Server, req.Conn)
	if err != nil {
		s.logger.ErrorContext(ctx, "add session", "mid", id.Mid, "key", id.Key, "err", err)
		return nil, status.Error(codes.Unavailable, "registry unavailable")
	}
	if prev != "" {
		s.replacer.replaced(id.Key, prev)
	}
	return &pb.ConnectReply{Mid: id.Mid, Key: id.Key, Rooms: id.Rooms, Accepts: id.Accepts, Platform: id.Platform,
		RoomGrants: id.RoomGrants, AnyRoom: id.AnyRoom, AnyAccept: id.AnyAccept,
		SessionTtl: int64(s.sessionTTL / time.Second)}, nil
}

func (s *grpcServer) Disconnect(ctx context.Context, req *pb.DisconnectReq) (*pb.DisconnectReply, error) {
	if err := validSession(req.Key, req.Server); err != nil {
		return nil, err
	}
	has, err := s.registry.DelSession(ctx, req.Mid, req.Key, req.Server, req.Conn)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "delete session: %v", err)
	}
	return &pb.DisconnectReply{Has: has}, nil
}

func (s *grpcServer) Heartbeat(ctx context.Context, req *pb.HeartbeatReq) (*pb.HeartbeatReply, error) {
	if err := validSession(req.Key, req.Server); err != nil {
		return nil, err
	}
	if err := s.registry.RenewSession(ctx, req.Mid, req.Key, req.Server, req.Conn); err != nil {
		return nil, status.Errorf(codes.Unavailable, "renew session: %v", err)
	}
	return &pb.HeartbeatReply{}, nil
}

func (s *grpcServer) RenewOnline(ctx context.Context, req *pb.RenewOnlineReq) (*pb.RenewOnlineReply, error) {
	if err := validNode(req.Node); err != nil {
		return nil, err
	}
	all, err := s.registry.RenewNode(ctx, req.Node)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "renew node: %v", err)
	}
	return &pb.RenewOnlineReply{AllRoomCount: all}, nil
}
