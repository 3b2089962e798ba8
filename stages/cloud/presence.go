package cloud

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// MaxPresence bounds the members one node returns for a room, whatever
// the caller asks: a 100,000-member room must not make a reply of
// megabytes (1,000 members of ~40 bytes each is ~40 KB).
const MaxPresence = 1000

// Presence lists the room's connections on this node: mid and key, at
// most req.Limit (capped at MaxPresence), truncated when there are more.
func (g *grpcServer) Presence(_ context.Context, req *pb.PresenceReq) (*pb.PresenceReply, error) {
	if err := wire.ValidRoom(req.Room); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "room: %v", err)
	}
	limit := int(req.Limit)
	if limit <= 0 || limit > MaxPresence {
		limit = MaxPresence
	}
	reply := &pb.PresenceReply{}
	for _, b := range g.s.buckets {
		if b.roomMembers(req.Room, reply, limit) {
			break
		}
	}
	return reply, nil
}

// roomMembers appends the bucket's members of room to reply up to limit
// in all, and reports whether reply is full (truncated set when a member
// was left out).
func (b *bucket) roomMembers(room string, reply *pb.PresenceReply, limit int) (full bool) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	for ch := range b.rooms[room] {
		if len(reply.Members) >= limit {
			reply.Truncated = true
			return true
		}
		reply.Members = append(reply.Members, &pb.PresenceMember{Mid: ch.mid, Key: ch.key})
	}
	return false
}
