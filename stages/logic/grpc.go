package logic

import (
	"context"
	"errors"
	"log/slog"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/proto/pb"
)

// grpcServer serves the Logic service cloud nodes call.
type grpcServer struct {
	pb.UnimplementedLogicServer
	auth     Authenticator
	registry Registry
	replacer *replacer
	logger   *slog.Logger
}

func (s *grpcServer) Connect(ctx context.Context, req *pb.ConnectReq) (*pb.ConnectReply, error) {
	id, err := s.auth.Authenticate(req.Token)
	if err != nil {
		s.logger.InfoContext(ctx, "client auth rejected", "server", req.Server, "remote", req.RemoteAddr, "err", err)
		if errors.Is(err, ErrUnauthenticated) {
			return nil, status.Error(codes.Unauthenticated, "invalid token")
		}
		return nil, status.Error(codes.Internal, "authenticate")
	}
	prev, err := s.registry.AddSession(ctx, id.Mid, id.Key, req.Server)
	if err != nil {
		s.logger.ErrorContext(ctx, "add session", "mid", id.Mid, "key", id.Key, "err", err)
		return nil, status.Error(codes.Unavailable, "registry unavailable")
	}
	if prev != "" {
		s.replacer.replaced(id.Key, prev)
	}
	return &pb.ConnectReply{Mid: id.Mid, Key: id.Key, Rooms: id.Rooms, Accepts: id.Accepts, Platform: id.Platform}, nil
}

func (s *grpcServer) Disconnect(ctx context.Context, req *pb.DisconnectReq) (*pb.DisconnectReply, error) {
	has, err := s.registry.DelSession(ctx, req.Mid, req.Key, req.Server)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "delete session: %v", err)
	}
	return &pb.DisconnectReply{Has: has}, nil
}

func (s *grpcServer) Heartbeat(ctx context.Context, req *pb.HeartbeatReq) (*pb.HeartbeatReply, error) {
	if err := s.registry.RenewSession(ctx, req.Mid, req.Key, req.Server); err != nil {
		return nil, status.Errorf(codes.Unavailable, "renew session: %v", err)
	}
	return &pb.HeartbeatReply{}, nil
}

func (s *grpcServer) RenewOnline(ctx context.Context, req *pb.RenewOnlineReq) (*pb.RenewOnlineReply, error) {
	if req.Node.GetId() == "" || req.Node.GetGrpcAddr() == "" {
		return nil, status.Error(codes.InvalidArgument, "node id and grpc_addr are required")
	}
	all, err := s.registry.RenewNode(ctx, req.Node)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "renew node: %v", err)
	}
	return &pb.RenewOnlineReply{AllRoomCount: all}, nil
}
