package redis

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	goredis "github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/proto"

	"imcloud/pipeline"
	"imcloud/proto/pb"
)

// Registry keeps sessions and cloud nodes in Redis, shared by every logic
// and job node of a cluster. Keys, under a prefix:
//
//	key:{key}            hash mid, server,    a session; expires without heartbeats
//	                     conn                 (conn: the connection on server; absent = 0)
//	mid:{mid}            hash key →           a user's keys; entries are checked against
//	                     "server conn"        key:{key} on read
//	{nodes}:node:{id}    NodeInfo (protobuf)  a cloud node; expires unless renewed
//	{nodes}:ids          set of node ids      stale ids are dropped when read
//	{nodes}:version      counter              bumped by every node report
//
// Under Redis Cluster a script or transaction may only touch one slot. A
// session's two keys hash apart, so no script touches both: the mid index
// is written in its own commands, before the session's script in one
// pipeline (go-redis' ClusterClient sends each part to its node), and
// cleaned after a delete succeeded, by a script that drops the entry only
// while it still names the deleted connection. The index may therefore
// name a key whose session is gone or refused a renewal; readers check
// every entry against key:{key}, as they always did. The node keys share
// the {nodes} hash tag, so a node report stays one transaction and the
// node list one MGET.
//
// Layout changes (issue 16): the node keys were node:{id}, nodes and
// nodes:version, without a hash tag, and mid entries held the server
// alone. A node reported under the old names is not seen by a process of
// this version (nor the reverse) until it reports again under the new
// ones: upgrade every process of a cluster together, or expect cloud nodes
// to be missing from the node list for one renewal interval. Old mid
// entries stay readable (only their keys are read) and expire with their
// hash.
type Registry struct {
	rdb        goredis.UniversalClient
	prefix     string
	sessionTTL time.Duration
	nodeTTL    time.Duration
}

// NewRegistry returns a registry in rdb under prefix.
func NewRegistry(rdb goredis.UniversalClient, prefix string, sessionTTL, nodeTTL time.Duration) *Registry {
	return &Registry{rdb: rdb, prefix: prefix, sessionTTL: sessionTTL, nodeTTL: nodeTTL}
}

func (r *Registry) keyKey(key string) string { return r.prefix + "key:" + key }
func (r *Registry) midKey(mid int64) string  { return r.prefix + "mid:" + strconv.FormatInt(mid, 10) }
func (r *Registry) nodeKey(id string) string { return r.prefix + "{nodes}:node:" + id }
func (r *Registry) nodesKey() string         { return r.prefix + "{nodes}:ids" }

// nodesVersionKey counts the node reports: a reader that kept the node
// list can ask whether it changed with one GET (NodesVersion).
func (r *Registry) nodesVersionKey() string { return r.prefix + "{nodes}:version" }

// indexEntry is a session's value in its user's mid index: which
// connection wrote it, so that deleting one session cannot drop the entry
// a newer connection of the same key wrote meanwhile.
func indexEntry(server string, conn uint64) string {
	return server + " " + strconv.FormatUint(conn, 10)
}

// addSession records the session and returns the server that held the key
// before and the connection there ({server, conn}; conn absent, stored by
// an older logic, is "0"), atomically. ARGV[5] "1" makes it a renewal: a
// live session of another connection (both conns named, and different) is
// left alone. KEYS[1] is the session alone: the mid index is written apart
// (AddSession).
var addSession = goredis.NewScript(`
local s = redis.call('HMGET', KEYS[1], 'server', 'conn')
local prev = s[1]
if ARGV[5] == '1' and prev and ARGV[4] ~= '0' and s[2] and s[2] ~= '0' and s[2] ~= ARGV[4] then return false end
redis.call('HSET', KEYS[1], 'mid', ARGV[1], 'server', ARGV[2], 'conn', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if not prev or prev == ARGV[2] then return false end
return {prev, s[2] or '0'}`)

// delSession deletes the session only if it is still mid's on server as
// connection ARGV[3]. A conn of 0 on either side (absent: stored by an
// older logic) matches any connection.
var delSession = goredis.NewScript(`
local s = redis.call('HMGET', KEYS[1], 'mid', 'server', 'conn')
if s[1] ~= ARGV[1] or s[2] ~= ARGV[2] then return 0 end
if ARGV[3] ~= '0' and s[3] and s[3] ~= '0' and s[3] ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
return 1`)

// delIndexEntry drops field ARGV[1] of the mid index KEYS[1] if it still
// holds ARGV[2], the deleted session's entry.
var delIndexEntry = goredis.NewScript(`
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0`)

// AddSession records key (of user mid) on server as connection conn and
// returns the server and connection that held it before, if on another
// server.
func (r *Registry) AddSession(ctx context.Context, mid int64, key, server string, conn uint64) (string, uint64, error) {
	return r.addSession(ctx, mid, key, server, conn, false)
}

func (r *Registry) addSession(ctx context.Context, mid int64, key, server string, conn uint64, renew bool) (string, uint64, error) {
	renewArg := "0"
	if renew {
		renewArg = "1"
	}
	keys := []string{r.keyKey(key)}
	args := []any{mid, server, r.sessionTTL.Milliseconds(), strconv.FormatUint(conn, 10), renewArg}
	// The index first: a reader that finds the session through its user
	// finds the entry. A renewal the script refuses has written it all
	// the same; readers check it against the session.
	pipe := r.rdb.Pipeline()
	index := pipe.HSet(ctx, r.midKey(mid), key, indexEntry(server, conn))
	expire := pipe.PExpire(ctx, r.midKey(mid), r.sessionTTL)
	session := addSession.EvalSha(ctx, pipe, keys, args...)
	_, _ = pipe.Exec(ctx)
	if err := cmp.Or(index.Err(), expire.Err()); err != nil {
		return "", 0, fmt.Errorf("redis add session %s: index it under user %d: %w", key, mid, err)
	}
	if goredis.HasErrorPrefix(session.Err(), "NOSCRIPT") {
		// Redis lost the script (flushed, restarted, a replica promoted).
		session = addSession.Run(ctx, r.rdb, keys, args...)
	}
	prev, err := session.StringSlice()
	if errors.Is(err, goredis.Nil) {
		return "", 0, nil
	}
	if err != nil {
		return "", 0, fmt.Errorf("redis add session %s: %w", key, err)
	}
	if len(prev) != 2 {
		return "", 0, fmt.Errorf("redis add session %s: previous session is %d fields, want 2", key, len(prev))
	}
	// A conn that does not parse (not written by logic) is unnamed: the
	// old connection is then closed by key alone, as before connections
	// were named. The new session is recorded either way.
	prevConn, _ := strconv.ParseUint(prev[1], 10, 64)
	return prev[0], prevConn, nil
}

// RenewSession extends a session's life; it re-creates one that expired.
// A live session of another connection is left alone: the heartbeat comes
// from a connection that was replaced.
func (r *Registry) RenewSession(ctx context.Context, mid int64, key, server string, conn uint64) error {
	_, _, err := r.addSession(ctx, mid, key, server, conn, true)
	return err
}

// DelSession removes key's session if it is still mid's on server as
// connection conn (0 on either side matches any: an older node or logic).
// True with an error: the session is gone but its entry in the user's
// index could not be dropped (readers skip it; it expires with the index).
func (r *Registry) DelSession(ctx context.Context, mid int64, key, server string, conn uint64) (bool, error) {
	n, err := delSession.Run(ctx, r.rdb, []string{r.keyKey(key)}, mid, server, strconv.FormatUint(conn, 10)).Int()
	if err != nil {
		return false, fmt.Errorf("redis delete session %s: %w", key, err)
	}
	if n != 1 {
		return false, nil
	}
	// The session is gone: a failure here leaves an index entry that
	// readers drop (it names no session) and that expires with the index.
	if err := delIndexEntry.Run(ctx, r.rdb, []string{r.midKey(mid)}, key, indexEntry(server, conn)).Err(); err != nil {
		return true, fmt.Errorf("redis delete session %s: drop it from user %d's index: %w", key, mid, err)
	}
	return true, nil
}

// sessions reads mid and server of each key; expired keys are absent.
func (r *Registry) sessions(ctx context.Context, keys []string) (map[string][2]string, error) {
	pipe := r.rdb.Pipeline()
	cmds := make([]*goredis.SliceCmd, len(keys))
	for i, k := range keys {
		cmds[i] = pipe.HMGet(ctx, r.keyKey(k), "mid", "server")
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, goredis.Nil) {
		return nil, fmt.Errorf("redis read sessions: %w", err)
	}
	out := make(map[string][2]string, len(keys))
	for i, c := range cmds {
		v := c.Val()
		mid, _ := v[0].(string)
		server, _ := v[1].(string)
		if server != "" {
			out[keys[i]] = [2]string{mid, server}
		}
	}
	return out, nil
}

// ServersByKeys maps each live key to its server.
func (r *Registry) ServersByKeys(ctx context.Context, keys []string) (map[string]string, error) {
	s, err := r.sessions(ctx, keys)
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(s))
	for k, v := range s {
		out[k] = v[1]
	}
	return out, nil
}

// SessionsByKeys maps each live key to its user and server.
func (r *Registry) SessionsByKeys(ctx context.Context, keys []string) (map[string]pipeline.Session, error) {
	s, err := r.sessions(ctx, keys)
	if err != nil {
		return nil, err
	}
	out := make(map[string]pipeline.Session, len(s))
	for k, v := range s {
		mid, err := strconv.ParseInt(v[0], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("redis read session %s: mid %q: %w", k, v[0], err)
		}
		out[k] = pipeline.Session{Mid: mid, Server: v[1]}
	}
	return out, nil
}

// KeysByMids maps each user with live keys to its keys and their servers.
func (r *Registry) KeysByMids(ctx context.Context, mids []int64) (map[int64]map[string]string, error) {
	pipe := r.rdb.Pipeline()
	cmds := make([]*goredis.MapStringStringCmd, len(mids))
	for i, m := range mids {
		cmds[i] = pipe.HGetAll(ctx, r.midKey(m))
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, goredis.Nil) {
		return nil, fmt.Errorf("redis read users: %w", err)
	}
	var keys []string
	for _, c := range cmds {
		for k := range c.Val() {
			keys = append(keys, k)
		}
	}
	live, err := r.sessions(ctx, keys)
	if err != nil {
		return nil, err
	}
	out := map[int64]map[string]string{}
	for i, m := range mids {
		for k := range cmds[i].Val() {
			// The index may name keys that expired or moved to another user.
			if s, ok := live[k]; ok && s[0] == strconv.FormatInt(m, 10) {
				if out[m] == nil {
					out[m] = map[string]string{}
				}
				out[m][k] = s[1]
			}
		}
	}
	return out, nil
}

// RenewNode records a cloud node and returns the online count of its rooms
// across every live node.
func (r *Registry) RenewNode(ctx context.Context, info *pb.NodeInfo) (map[string]int32, error) {
	b, err := proto.Marshal(info)
	if err != nil {
		return nil, fmt.Errorf("encode node %s: %w", info.Id, err)
	}
	pipe := r.rdb.TxPipeline()
	pipe.Set(ctx, r.nodeKey(info.Id), b, r.nodeTTL)
	pipe.SAdd(ctx, r.nodesKey(), info.Id)
	pipe.Incr(ctx, r.nodesVersionKey())
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, fmt.Errorf("redis renew node %s: %w", info.Id, err)
	}
	nodes, err := r.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	all := make(map[string]int32, len(info.RoomCount))
	for _, n := range nodes {
		for room, c := range n.RoomCount {
			if _, asked := info.RoomCount[room]; asked {
				all[room] += c
			}
		}
	}
	return all, nil
}

// NodesVersion is a number that changes with every node report
// (RenewNode): a node list read after version v was read is current while
// the version is still v (nodecache.Versioned). Lapsed nodes do not
// change it; they only leave the list.
func (r *Registry) NodesVersion(ctx context.Context) (uint64, error) {
	v, err := r.rdb.Get(ctx, r.nodesVersionKey()).Uint64()
	if errors.Is(err, goredis.Nil) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("redis read the node list's version: %w", err)
	}
	return v, nil
}

// Nodes returns the live cloud nodes, by id; ids whose node lapsed are
// dropped from the set.
func (r *Registry) Nodes(ctx context.Context) ([]*pb.NodeInfo, error) {
	ids, err := r.rdb.SMembers(ctx, r.nodesKey()).Result()
	if err != nil {
		return nil, fmt.Errorf("redis list nodes: %w", err)
	}
	if len(ids) == 0 {
		return nil, nil
	}
	slices.Sort(ids)
	keys := make([]string, len(ids))
	for i, id := range ids {
		keys[i] = r.nodeKey(id)
	}
	vals, err := r.rdb.MGet(ctx, keys...).Result()
	if err != nil {
		return nil, fmt.Errorf("redis read nodes: %w", err)
	}
	var out []*pb.NodeInfo
	var lapsed []any
	for i, v := range vals {
		s, ok := v.(string)
		if !ok {
			lapsed = append(lapsed, ids[i])
			continue
		}
		var n pb.NodeInfo
		if err := proto.Unmarshal([]byte(s), &n); err != nil {
			return nil, fmt.Errorf("decode node %s: %w", ids[i], err)
		}
		out = append(out, &n)
	}
	if len(lapsed) > 0 {
		r.rdb.SRem(ctx, r.nodesKey(), lapsed...)
	}
	return out, nil
}
