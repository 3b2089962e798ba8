//go:build integration

package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/adapters/amqp"
	"imcloud/pipeline"
	"imcloud/proto/pb"
	"imcloud/proto/wire"

	"imcloud/proto/client"
	"imcloud/stages/logic/token"
)

// TestIntegrationCluster runs 2 logic, 2 job and 2 cloud processes on
// RabbitMQ and Redis: pushes by user and by room reach connections on both
// cloud nodes, both logic nodes count the same totals, and a killed cloud
// node's users turn offline without errors; the pushes to them that were
// answered online before the node lapsed are poisoned as undelivered,
// and nothing else is.
func TestIntegrationCluster(t *testing.T) {
	bin := buildBinary(t)
	prefix := redisPrefix(t)
	common := []string{"run",
		"--set", "registry.kind=redis", "--set", "registry.redis.prefix=" + prefix, "--set", "job.dedupe.store=redis",
		"--set", "logic.auth.jwt_secret=" + testSecret, "--set", "logic.api_keys=" + testAPIKey,
		"--set", "cloud.renew_interval=300ms", "--set", "logic.session_ttl=30s",
		"--set", "job.retry.initial_interval=50ms", "--set", "job.offline_grace=1s",
	}
	topics := amqpTopics(t)
	for _, s := range topics {
		common = append(common, "--set", s)
	}
	args := func(extra ...string) []string { return append(slices.Clone(common), extra...) }

	logicHTTP := []string{freeAddr(t), freeAddr(t)}
	logicGRPC := []string{freeAddr(t), freeAddr(t)}
	for i := range 2 {
		startProc(t, bin, args("--stages", "logic", "--set", "logic.http_addr="+logicHTTP[i], "--set", "logic.grpc_addr="+logicGRPC[i])...)
	}
	type cloudNode struct{ ws, tcp, grpc string }
	clouds := []cloudNode{{freeAddr(t), freeAddr(t), freeAddr(t)}, {freeAddr(t), freeAddr(t), freeAddr(t)}}
	var cloudProcs []*proc
	for i, c := range clouds {
		cloudProcs = append(cloudProcs, startProc(t, bin, args("--stages", "cloud", "--set", "node_id=cloud"+string(rune('1'+i)),
			"--set", "cloud.ws_addr="+c.ws, "--set", "cloud.tcp_addr="+c.tcp, "--set", "cloud.grpc_addr="+c.grpc,
			"--set", "cloud.advertise_addr="+c.grpc, "--set", "cloud.logic_addr="+logicGRPC[i])...))
	}
	for range 2 {
		startProc(t, bin, args("--stages", "job")...)
	}

	dial := func(target string, cl token.Claims) *client.Conn {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		c, err := client.Dial(ctx, target, client.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		_ = c.SetReadDeadline(time.Now().Add(wait))
		tok, _ := token.Sign(testSecret, cl, time.Hour)
		if _, err := c.Auth([]byte(tok)); err != nil {
			t.Fatal(err)
		}
		return c
	}
	// Every process holds the cluster secret (startProc); a caller without
	// it is refused by logic's and cloud's gRPC.
	conn, ctx := rawConn(t, logicGRPC[0], "")
	if _, err := pb.NewLogicClient(conn).RenewOnline(ctx, &pb.RenewOnlineReq{Node: &pb.NodeInfo{Id: "forged", GrpcAddr: "127.0.0.1:1"}}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("logic RenewOnline without the cluster secret: %v, want Unauthenticated", err)
	}
	conn, ctx = rawConn(t, clouds[0].grpc, "")
	if _, err := pb.NewCloudClient(conn).Ping(ctx, &pb.PingReq{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("cloud Ping without the cluster secret: %v, want Unauthenticated", err)
	}
	u7a := dial("ws://"+clouds[0].ws+"/sub", token.Claims{Mid: 7, Rooms: []string{"live://c"}})
	u7b := dial(clouds[1].tcp, token.Claims{Mid: 7, Rooms: []string{"live://c"}})
	u8 := dial("ws://"+clouds[1].ws+"/sub", token.Claims{Mid: 8, Rooms: []string{"live://c"}})

	post := func(logicAddr, path string, q url.Values, body string) map[string]any {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, "http://"+logicAddr+path+"?"+q.Encode(), strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+testAPIKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var rep map[string]any
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || json.Unmarshal(b, &rep) != nil {
			t.Fatalf("POST %s: %d %s", path, resp.StatusCode, b)
		}
		return rep["data"].(map[string]any)
	}

	body := uniq("to user 7")
	post(logicHTTP[1], "/im/push/mids", url.Values{"operation": {"1000"}, "mids": {"7"}}, body)
	expect(t, "user 7 on cloud1", u7a, 1000, body)
	expect(t, "user 7 on cloud2", u7b, 1000, body)

	body = uniq("to the room")
	post(logicHTTP[0], "/im/push/room", url.Values{"operation": {"1000"}, "type": {"live"}, "room": {"c"}}, body)
	for name, c := range map[string]*client.Conn{"7 on cloud1": u7a, "7 on cloud2": u7b, "8 on cloud2": u8} {
		expect(t, name, c, 1000, body)
	}

	total := func(logicAddr string) int {
		req, _ := http.NewRequest(http.MethodGet, "http://"+logicAddr+"/im/online/total", nil)
		req.Header.Set("Authorization", "Bearer "+testAPIKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var rep struct {
			Data struct {
				Conns int `json:"conn_count"`
			} `json:"data"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&rep)
		return rep.Data.Conns
	}
	waitFor(t, "both logic nodes count 3 connections", func() bool { return total(logicHTTP[0]) == 3 && total(logicHTTP[1]) == 3 })

	// Upstream: a message sent on each cloud node arrives once on the
	// upstream topic, as a business consumer reads it.
	var upstream string
	for _, s := range topics {
		if v, ok := strings.CutPrefix(s, "topics.upstream="); ok {
			upstream = v
		}
	}
	sub, err := amqp.NewSubscriber(amqpURL(), watermill.NopLogger{}, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	ups, err := sub.Subscribe(context.Background(), upstream)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*client.Conn{u7a, u8} {
		if _, err := c.Send(wire.OpSendMsg, []byte("up")); err != nil {
			t.Fatal(err)
		}
		expect(t, "op 5", c, wire.OpSendMsgReply, "")
	}
	fromMid := map[string]int{}
	for range 2 {
		select {
		case m := <-ups:
			fromMid[m.Metadata.Get(pipeline.MetaMid)]++
			m.Ack()
		case <-time.After(wait):
			t.Fatalf("upstream messages: got %v, want one from 7 and one from 8", fromMid)
		}
	}
	if fromMid["7"] != 1 || fromMid["8"] != 1 {
		t.Fatalf("upstream messages by mid %v, want 7:1 8:1", fromMid)
	}

	// Kill cloud2: user 8 turns offline within the node's TTL (3 reports),
	// long before its session's 30s TTL. The pushes answered online in
	// between are not delivered: poisoned as "recipients offline", never
	// counted as delivered.
	if err := cloudProcs[1].cmd.Process.Signal(os.Kill); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "user 8 reported offline", func() bool {
		data := post(logicHTTP[0], "/im/push/mids", url.Values{"operation": {"1000"}, "mids": {"8"}}, "x")
		off, _ := data["offline_mids"].([]any)
		return len(off) == 1
	})
	body = uniq("after the kill")
	data := post(logicHTTP[1], "/im/push/mids", url.Values{"operation": {"1000"}, "mids": {"7"}}, body)
	if data["online"] != float64(1) {
		t.Fatalf("user 7 after cloud2 died: %v, want 1 connection online", data)
	}
	collect(t, "user 7 on cloud1", u7a, []string{body})
	waitFor(t, "total drops to 1", func() bool { return total(logicHTTP[0]) == 1 })
	poisoned, _, err := poisonQueue(t, topics).List(context.Background(), "", 1000)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range poisoned {
		if reason := p.Metadata.Get(middleware.ReasonForPoisonedKey); !strings.HasPrefix(reason, pipeline.ReasonRecipientsOffline) || string(p.Payload) == "" {
			t.Fatalf("poisoned %s: %q; only pushes to the killed node's users may be, as undelivered", p.ID, reason)
		}
	}
}
